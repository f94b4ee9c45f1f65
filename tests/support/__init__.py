"""Test infrastructure: real Redis and SeaweedFS (S3) servers started on private loopback ports."""
