"""Test doubles of the services the job talks to: the Hugging Face Hub (hub.py) and S3 (s3.py)."""
