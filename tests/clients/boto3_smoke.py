#!/usr/bin/env python3
"""boto3 with default settings (checksums on, aws-chunked uploads) against a bdr S3
endpoint given by the standard AWS_* environment variables. Exits non-zero on the first
mismatch, printing what went wrong. Run by tests/tests/s3_clients.rs."""
import hashlib, os, sys, urllib.request

import boto3
from botocore.exceptions import ClientError

s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
bucket = "boto3-smoke"


def check(condition, message):
    if not condition:
        print(f"boto3 smoke: FAILED: {message}", file=sys.stderr)
        sys.exit(1)


s3.create_bucket(Bucket=bucket)
check(bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]], "bucket not listed")

small = os.urandom(1000)
s3.put_object(Bucket=bucket, Key="small", Body=small, ContentType="application/x-test", Metadata={"owner": "ops"})
got = s3.get_object(Bucket=bucket, Key="small")
check(got["Body"].read() == small, "small object differs")
check(got["ContentType"] == "application/x-test", f"content type {got['ContentType']}")
check(got["Metadata"].get("owner") == "ops", f"metadata {got['Metadata']}")
check(got["ETag"].strip('"') == hashlib.md5(small).hexdigest(), "ETag is not the MD5")

# Multipart through the transfer manager (12 MiB in 5 MiB parts).
big = os.urandom(12 * 1024 * 1024 + 3)
path = "/tmp/boto3-smoke-big"
with open(path, "wb") as f:
    f.write(big)
config = boto3.s3.transfer.TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
s3.upload_file(path, bucket, "big", Config=config)
check(s3.get_object(Bucket=bucket, Key="big")["Body"].read() == big, "multipart object differs")
check(s3.head_object(Bucket=bucket, Key="big")["ETag"].endswith('-3"'), "multipart ETag")
ranged = s3.get_object(Bucket=bucket, Key="big", Range="bytes=5242870-5242890")["Body"].read()
check(ranged == big[5242870:5242891], "range differs")

# Listing with prefix, delimiter and pagination.
for index in range(7):
    s3.put_object(Bucket=bucket, Key=f"dir/{index % 2}/k{index}", Body=b"x")
page = s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
check([p["Prefix"] for p in page.get("CommonPrefixes", [])] == ["dir/0/", "dir/1/"], f"prefixes {page}")
keys, token = [], None
while True:
    kwargs = {"Bucket": bucket, "Prefix": "dir/", "MaxKeys": 3}
    if token:
        kwargs["ContinuationToken"] = token
    page = s3.list_objects_v2(**kwargs)
    keys += [o["Key"] for o in page.get("Contents", [])]
    if not page.get("IsTruncated"):
        break
    token = page["NextContinuationToken"]
check(keys == sorted(f"dir/{i % 2}/k{i}" for i in range(7)), f"paginated keys {keys}")

# Presigned GET and PUT used with a plain HTTP client.
url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "small"}, ExpiresIn=300)
check(urllib.request.urlopen(url).read() == small, "presigned GET differs")
url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "presigned"}, ExpiresIn=300)
request = urllib.request.Request(url, data=b"via presigned PUT", method="PUT")
urllib.request.urlopen(request).read()
check(s3.get_object(Bucket=bucket, Key="presigned")["Body"].read() == b"via presigned PUT", "presigned PUT")

# Errors with the right codes.
for call, code in [
    (lambda: s3.get_object(Bucket=bucket, Key="missing"), "NoSuchKey"),
    (lambda: s3.get_object(Bucket="no-such-bucket-x", Key="k"), "NoSuchBucket"),
    (lambda: s3.delete_bucket(Bucket=bucket), "BucketNotEmpty"),
    (lambda: s3.get_object(Bucket=bucket, Key="small", Range="bytes=5000-6000"), "InvalidRange"),
]:
    try:
        call()
        check(False, f"expected {code}")
    except ClientError as error:
        check(error.response["Error"]["Code"] == code, f"expected {code}, got {error.response['Error']}")

s3.delete_object(Bucket=bucket, Key="small")
try:
    s3.head_object(Bucket=bucket, Key="small")
    check(False, "deleted object still there")
except ClientError as error:
    check(error.response["Error"]["Code"] in ("404", "NoSuchKey"), f"head after delete: {error.response}")
print("boto3 smoke: ok")
