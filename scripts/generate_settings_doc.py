"""Write docs/settings.md from the fields of ``producer.Settings``: their variables, defaults and meanings.

    python scripts/generate_settings_doc.py           # (re)write the page
    python scripts/generate_settings_doc.py --check   # exit 1 if the page differs from the fields

tests/unit/test_settings.py fails while the page is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "settings.md"

INTRO = """\
# Settings

One settings object, `producer.Settings`, read from `ACTMAP_*` environment variables (a
`Settings(...)` keyword overrides them, and so does each `actmap` global flag:
`actmap --broker-url … worker`). Producer and workers read the same variables; each uses
the ones that concern it. Unset URLs fall back to the embedded default under `ACTMAP_HOME`:
no server at all.

This page is generated from the fields (`python scripts/generate_settings_doc.py`).

| variable | default | meaning |
|---|---|---|
"""

NOTES = """
A worker checks its settings as it starts and stops, saying why, if they cannot work: a storage
URL of an unknown scheme, or a visibility timeout too short for a retried message's work (its
wait, the longest PUT and a margin), which would let the broker hand a map to a second worker
while the first still works on it.

Credentials never come from these settings: S3 credentials come from boto3's standard chain
(environment, `~/.aws`, instance role), for obstore too; broker and result backend credentials
are part of their URLs.
"""


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from producer.settings import Settings

    rows = []
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else f"`{_shown(field.default)}`"
        rows.append(f"| `ACTMAP_{name.upper()}` | {default} | {field.description} |")
    return INTRO + "\n".join(rows) + "\n" + NOTES


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale; rerun without --check", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
