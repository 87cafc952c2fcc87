"""docker-compose.yml made to run on a CPU-only podman host (.ci/image-test.sh), printed to stdout.

    python compose_cpu.py docker-compose.yml cpu.env JOB_IMAGE S3_IMAGE

Only what this host cannot do is changed; the services, their wiring (endpoint, keys, bucket, volumes, grace
period, restart policy) stay as users get them:
- train: no GPU reservation; the image built by CI instead of `build: .`; the tiny CPU run's settings (what a
  user's .env would hold); no ulimits (setting them needs CAP_SYS_RESOURCE, which a CI sandbox may lack).
- minio: moto's S3 server built here (no registry serves minio/minio), on MinIO's port; no healthcheck (no `mc`
  in it; podman 4.3 cannot wait for service_healthy anyway, so the services are started one at a time); no ports
  published on the host (a shared CI machine's 9000 may be taken; the checkpoints are listed over the compose
  network).
- createbucket: the job image's boto3 instead of minio/mc, with the same endpoint and keys, waiting for the server.
"""
import sys

import yaml

CREATE_BUCKET = """
import os, sys, time
import boto3, botocore.exceptions
s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"])
for attempt in range(60):
    try:
        s3.create_bucket(Bucket=os.environ["BUCKET"])
        break
    except s3.exceptions.BucketAlreadyOwnedByYou:
        break
    except botocore.exceptions.EndpointConnectionError:
        time.sleep(1)
else:
    sys.exit("the S3 server did not answer in 60 s")
print("bucket", os.environ["BUCKET"], "ready")
"""


def main(source: str, cpu_env: str, image: str, s3_image: str) -> None:
    compose = yaml.safe_load(open(source))
    services = compose["services"]
    train, minio, bucket = services["train"], services["minio"], services["createbucket"]
    env = train["environment"]
    settings = dict(line.strip().split("=", 1) for line in open(cpu_env)
                    if line.strip() and not line.startswith("#"))
    train.pop("deploy")
    train.pop("build")
    train.pop("ulimits")
    train["image"] = image
    train["environment"] = {**settings, "RUN_ID": "cpu-compose", **env}
    minio.pop("healthcheck")
    minio.pop("command")
    minio.pop("ports")
    minio["image"] = s3_image
    endpoint, bucket_name = env["AWS_ENDPOINT_URL_S3"], env["CHECKPOINT_URI"].split("/")[2]
    bucket["image"] = image
    bucket["entrypoint"] = ["python", "-c", CREATE_BUCKET]
    bucket.pop("command")
    bucket["environment"] = {"ENDPOINT": endpoint, "BUCKET": bucket_name,
                             **{k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    yaml.safe_dump(compose, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
