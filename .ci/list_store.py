"""The run's objects in the S3 service, listed with boto3 (.ci/image-test.sh, in the job image on the compose
network): its committed checkpoints (those with a MANIFEST.json) and whether final/ is committed."""
import os
import re

import boto3

bucket, prefix = re.fullmatch(r"s3://([^/]+)/?(.*)", os.environ["CHECKPOINT_URI"]).groups()
run = f"{prefix.rstrip('/')}/{os.environ['RUN_ID']}/"
s3 = boto3.client("s3")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=run)
        for o in page.get("Contents", [])]
for key in sorted(keys):
    print(f"s3://{bucket}/{key}")
steps = sorted(int(m.group(1)) for k in keys if (m := re.search(r"checkpoints/step-(\d+)/MANIFEST\.json$", k)))
print("committed checkpoints:", " ".join(map(str, steps)) or "none")
print("final:", "committed" if f"{run}final/MANIFEST.json" in keys else "missing")
