#!/usr/bin/env python3
"""boto3 with default settings (checksums on, aws-chunked uploads) against a bdr S3
endpoint given by the standard AWS_* environment variables. Exits non-zero on the first
mismatch, printing what went wrong. Run by tests/tests/s3_clients.rs."""
import base64, datetime, hashlib, os, sys, urllib.request, zlib

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

# A multipart upload declaring CRC32 gets S3's composite checksum: the CRC32 of the
# parts' (decoded) CRC32s, then "-N".
parts_data = [os.urandom(5 * 1024 * 1024), os.urandom(100)]
upload = s3.create_multipart_upload(Bucket=bucket, Key="composite", ChecksumAlgorithm="CRC32")
completed_parts = []
for number, part_data in enumerate(parts_data, start=1):
    answer = s3.upload_part(Bucket=bucket, Key="composite", UploadId=upload["UploadId"], PartNumber=number,
                            Body=part_data, ChecksumAlgorithm="CRC32")
    completed_parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": answer["ChecksumCRC32"]})
done = s3.complete_multipart_upload(Bucket=bucket, Key="composite", UploadId=upload["UploadId"],
                                    MultipartUpload={"Parts": completed_parts})
crc_of = lambda data: zlib.crc32(data).to_bytes(4, "big")
expected = base64.b64encode(crc_of(b"".join(crc_of(part) for part in parts_data))).decode() + "-2"
check(done.get("ChecksumCRC32") == expected, f"composite on completion {done.get('ChecksumCRC32')} != {expected}")
head = s3.head_object(Bucket=bucket, Key="composite", ChecksumMode="ENABLED")
check(head.get("ChecksumCRC32") == expected, f"composite on HEAD {head}")
got = s3.get_object(Bucket=bucket, Key="composite", ChecksumMode="ENABLED")
check(got["Body"].read() == b"".join(parts_data), "composite object differs")

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

# Checksums: boto3 sends a CRC32 trailer by default; the gateway verifies it, stores it
# and returns it when asked; an explicit SHA256 likewise; a wrong one is refused.
def b64(digest):
    return base64.b64encode(digest).decode()


crc32 = b64(zlib.crc32(small).to_bytes(4, "big"))
check(s3.head_object(Bucket=bucket, Key="small", ChecksumMode="ENABLED").get("ChecksumCRC32") == crc32,
      "stored CRC32 differs")
answer = s3.put_object(Bucket=bucket, Key="sha", Body=small, ChecksumAlgorithm="SHA256")
check(answer.get("ChecksumSHA256") == b64(hashlib.sha256(small).digest()), f"put SHA256 answer {answer}")
fetched = s3.get_object(Bucket=bucket, Key="sha", ChecksumMode="ENABLED")
check(fetched["Body"].read() == small and fetched.get("ChecksumSHA256") == b64(hashlib.sha256(small).digest()),
      "get SHA256")
for kwargs in [{"ChecksumCRC32": b64(b"\0\0\0\0")}, {"ChecksumSHA1": b64(hashlib.sha1(b"other").digest())}]:
    try:
        s3.put_object(Bucket=bucket, Key="bad-checksum", Body=small, **kwargs)
        check(False, f"a wrong checksum was accepted: {kwargs}")
    except ClientError as error:
        check(error.response["Error"]["Code"] == "BadDigest", f"wrong checksum: {error.response['Error']}")
try:
    s3.head_object(Bucket=bucket, Key="bad-checksum")
    check(False, "an object with a wrong checksum was stored")
except ClientError as error:
    check(error.response["ResponseMetadata"]["HTTPStatusCode"] == 404, f"{error.response}")

# Conditional reads: an ETag that matches, dates before and after the object's time.
etag = s3.head_object(Bucket=bucket, Key="small")["ETag"]
check(s3.get_object(Bucket=bucket, Key="small", IfMatch=etag)["Body"].read() == small, "If-Match")
past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
check(s3.get_object(Bucket=bucket, Key="small", IfModifiedSince=past)["Body"].read() == small, "If-Modified-Since past")
for kwargs, status in [
    ({"IfModifiedSince": future}, 304),
    ({"IfUnmodifiedSince": past}, 412),
    ({"IfNoneMatch": etag}, 304),
    ({"IfMatch": '"0123"'}, 412),
]:
    try:
        s3.get_object(Bucket=bucket, Key="small", **kwargs)
        check(False, f"expected {status} for {kwargs}")
    except ClientError as error:
        got_status = error.response["ResponseMetadata"]["HTTPStatusCode"]
        check(got_status == status, f"{kwargs}: expected {status}, got {got_status}")

# Server-side copies: same metadata by default, replaced on request, conditions honoured,
# a byte range of a source as a multipart part.
s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "small"})
copied = s3.get_object(Bucket=bucket, Key="copy")
check(copied["Body"].read() == small, "copy differs")
check(copied["Metadata"].get("owner") == "ops" and copied["ContentType"] == "application/x-test", f"copy metadata {copied}")
s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "copy"}, MetadataDirective="REPLACE",
               Metadata={"owner": "dev"}, ContentType="text/plain")
replaced = s3.head_object(Bucket=bucket, Key="copy")
check(replaced["Metadata"] == {"owner": "dev"} and replaced["ContentType"] == "text/plain", f"replaced {replaced}")
try:
    s3.copy_object(Bucket=bucket, Key="copy2", CopySource={"Bucket": bucket, "Key": "small"}, CopySourceIfMatch='"0123"')
    check(False, "copy with a failing condition succeeded")
except ClientError as error:
    check(error.response["Error"]["Code"] == "PreconditionFailed", f"copy condition: {error.response['Error']}")
s3.copy_object(Bucket=bucket, Key="big-copy", CopySource={"Bucket": bucket, "Key": "big"})
check(s3.get_object(Bucket=bucket, Key="big-copy")["Body"].read() == big, "copy of a multipart object differs")

upload = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
first = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload, PartNumber=1,
                            CopySource={"Bucket": bucket, "Key": "big"}, CopySourceRange="bytes=0-5242879")
second = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload, PartNumber=2,
                             CopySource={"Bucket": bucket, "Key": "small"})
pending = s3.list_multipart_uploads(Bucket=bucket)
check([(u["Key"], u["UploadId"]) for u in pending.get("Uploads", [])] == [("assembled", upload)], f"uploads {pending}")
s3.complete_multipart_upload(Bucket=bucket, Key="assembled", UploadId=upload, MultipartUpload={"Parts": [
    {"PartNumber": 1, "ETag": first["CopyPartResult"]["ETag"]},
    {"PartNumber": 2, "ETag": second["CopyPartResult"]["ETag"]},
]})
check(s3.get_object(Bucket=bucket, Key="assembled")["Body"].read() == big[:5242880] + small, "part copies differ")
check(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "completed upload still listed")

# Uploads listed with prefix, delimiter and pagination; aborted ones disappear.
started = sorted((key, s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
                 for key in ["up/a", "up/b", "up/b", "up/sub/c", "other"])
listed, kwargs = [], {"Bucket": bucket, "Prefix": "up/", "MaxUploads": 2}
while True:
    page = s3.list_multipart_uploads(**kwargs)
    listed += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
    if not page["IsTruncated"]:
        break
    kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
check(listed == [entry for entry in started if entry[0].startswith("up/")], f"paginated uploads {listed}")
page = s3.list_multipart_uploads(Bucket=bucket, Prefix="up/", Delimiter="/")
check([p["Prefix"] for p in page.get("CommonPrefixes", [])] == ["up/sub/"], f"upload prefixes {page}")
check(sorted(u["Key"] for u in page.get("Uploads", [])) == ["up/a", "up/b", "up/b"], f"upload keys {page}")
for key, upload_id in started:
    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
check(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "aborted uploads still listed")

# Without versioning every object has one version, "null", the latest.
versions = s3.list_object_versions(Bucket=bucket, Prefix="dir/0/")
check([(v["Key"], v["VersionId"], v["IsLatest"]) for v in versions.get("Versions", [])]
      == [(f"dir/0/k{i}", "null", True) for i in (0, 2, 4, 6)], f"versions {versions}")

# Many keys deleted in one request, an absent one included (S3 reports it deleted).
doomed = [f"dir/{i % 2}/k{i}" for i in range(7)] + ["never-existed"]
answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in doomed]})
check(sorted(d["Key"] for d in answer.get("Deleted", [])) == sorted(doomed) and not answer.get("Errors"), f"{answer}")
check(s3.list_objects_v2(Bucket=bucket, Prefix="dir/").get("KeyCount") == 0, "deleted keys still listed")

# Clock skew: a request signed 10 minutes off is accepted, 20 minutes either way refused
# with RequestTimeTooSkewed (S3's 15-minute window).
import botocore.auth
from botocore.config import Config

real_now = botocore.auth.get_current_datetime
skewed = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(retries={"max_attempts": 1}))
try:
    for minutes, accepted in [(10, True), (-10, True), (20, False), (-20, False)]:
        botocore.auth.get_current_datetime = lambda minutes=minutes: real_now() + datetime.timedelta(minutes=minutes)
        try:
            skewed.head_object(Bucket=bucket, Key="small")
            check(accepted, f"a request {minutes} minutes off was accepted")
        except ClientError as error:
            check(not accepted, f"a request {minutes} minutes off was refused: {error.response}")
            code = error.response["Error"]["Code"]
            check(code in ("RequestTimeTooSkewed", "403"), f"{minutes} minutes off: {error.response}")
            check(error.response["ResponseMetadata"]["HTTPStatusCode"] == 403, f"{error.response}")
        try:
            skewed.list_objects_v2(Bucket=bucket, MaxKeys=1)
            check(accepted, f"a listing {minutes} minutes off was accepted")
        except ClientError as error:
            check(not accepted and error.response["Error"]["Code"] == "RequestTimeTooSkewed", f"{error.response}")
finally:
    botocore.auth.get_current_datetime = real_now

# Standard headers are stored and returned, on plain and multipart objects.
s3.put_object(Bucket=bucket, Key="headers", Body=b"h", CacheControl="max-age=60",
              ContentDisposition='attachment; filename="h.txt"', ContentEncoding="identity",
              ContentLanguage="en", Expires=datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc))
for head in (s3.head_object(Bucket=bucket, Key="headers"), s3.get_object(Bucket=bucket, Key="headers")):
    sent = head["ResponseMetadata"]["HTTPHeaders"]
    check(sent.get("cache-control") == "max-age=60", f"cache-control {sent}")
    check(sent.get("content-disposition") == 'attachment; filename="h.txt"', f"content-disposition {sent}")
    check(sent.get("content-encoding") == "identity", f"content-encoding {sent}")
    check(sent.get("content-language") == "en", f"content-language {sent}")
    check(sent.get("expires") == "Tue, 01 Jan 2030 00:00:00 GMT", f"expires {sent}")
s3.upload_file(path, bucket, "big-with-headers", Config=config,
               ExtraArgs={"ContentDisposition": "inline", "CacheControl": "no-cache"})
sent = s3.head_object(Bucket=bucket, Key="big-with-headers")["ResponseMetadata"]["HTTPHeaders"]
check(sent.get("content-disposition") == "inline" and sent.get("cache-control") == "no-cache", f"multipart headers {sent}")
check("content-encoding" not in sent, f"aws-chunked leaked into Content-Encoding: {sent}")


def error_code(call, **kwargs):
    try:
        call(**kwargs)
    except ClientError as error:
        return error.response["Error"]["Code"], error.response["ResponseMetadata"]["HTTPHeaders"]
    return None, {}


# Versioning: every write kept, delete markers, reads and deletes by version id.
versioned = "boto3-versions"
s3.create_bucket(Bucket=versioned)
check(s3.get_bucket_versioning(Bucket=versioned).get("Status") is None, "new bucket is versioned")
check(s3.put_object(Bucket=versioned, Key="doc", Body=b"v0").get("VersionId") is None, "unversioned put has an id")
s3.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
check(s3.get_bucket_versioning(Bucket=versioned).get("Status") == "Enabled", "versioning not enabled")
v1 = s3.put_object(Bucket=versioned, Key="doc", Body=b"v1")["VersionId"]
v2 = s3.put_object(Bucket=versioned, Key="doc", Body=b"v2")["VersionId"]
check(len({v1, v2, "null"}) == 3, f"version ids {v1} {v2}")
got = s3.get_object(Bucket=versioned, Key="doc")
check(got["Body"].read() == b"v2" and got["VersionId"] == v2, "current version")
check(s3.get_object(Bucket=versioned, Key="doc", VersionId=v1)["Body"].read() == b"v1", "version v1")
check(s3.get_object(Bucket=versioned, Key="doc", VersionId="null")["Body"].read() == b"v0", "null version")
check(s3.head_object(Bucket=versioned, Key="doc", VersionId=v1)["ContentLength"] == 2, "head by version")
deleted = s3.delete_object(Bucket=versioned, Key="doc")
check(deleted.get("DeleteMarker") is True and deleted.get("VersionId"), f"delete marker {deleted}")
marker = deleted["VersionId"]
code, headers = error_code(s3.get_object, Bucket=versioned, Key="doc")
check(code == "NoSuchKey" and headers.get("x-amz-delete-marker") == "true", f"read behind a marker {code} {headers}")
code, _ = error_code(s3.get_object, Bucket=versioned, Key="doc", VersionId="f" * 40)
check(code == "NoSuchVersion", f"unknown version {code}")
check(s3.list_objects_v2(Bucket=versioned).get("KeyCount") == 0, "a deleted key is listed")
listing = s3.list_object_versions(Bucket=versioned)
check([(v["VersionId"], v["IsLatest"]) for v in listing["Versions"]] == [(v2, False), (v1, False), ("null", False)],
      f"versions {listing}")
check([(m["VersionId"], m["IsLatest"]) for m in listing["DeleteMarkers"]] == [(marker, True)], f"markers {listing}")
paged, kwargs = [], {"Bucket": versioned, "MaxKeys": 1}
while True:
    page = s3.list_object_versions(**kwargs)
    paged += [v["VersionId"] for v in page.get("DeleteMarkers", []) + page.get("Versions", [])]
    if not page["IsTruncated"]:
        break
    kwargs.update(KeyMarker=page["NextKeyMarker"], VersionIdMarker=page["NextVersionIdMarker"])
check(paged == [marker, v2, v1, "null"], f"paged versions {paged}")
s3.copy_object(Bucket=versioned, Key="copy", CopySource={"Bucket": versioned, "Key": "doc", "VersionId": v1})
check(s3.get_object(Bucket=versioned, Key="copy")["Body"].read() == b"v1", "copy of an old version")
s3.delete_object(Bucket=versioned, Key="doc", VersionId=marker)
check(s3.get_object(Bucket=versioned, Key="doc")["Body"].read() == b"v2", "marker removed, v2 is back")
code, _ = error_code(s3.delete_bucket, Bucket=versioned)
check(code == "BucketNotEmpty", f"delete of a bucket with versions: {code}")
everything = s3.list_object_versions(Bucket=versioned)
doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]} for v in everything.get("Versions", []) + everything.get("DeleteMarkers", [])]
answer = s3.delete_objects(Bucket=versioned, Delete={"Objects": doomed})
check(len(answer.get("Deleted", [])) == len(doomed) and not answer.get("Errors"), f"delete versions {answer}")
s3.delete_bucket(Bucket=versioned)

# Object Lock: a locked version is deleted by nobody until its retention ends.
locked = "boto3-locked"
s3.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
check(s3.get_bucket_versioning(Bucket=locked).get("Status") == "Enabled", "a lock bucket is versioned")
code, _ = error_code(s3.put_bucket_versioning, Bucket=locked, VersioningConfiguration={"Status": "Suspended"})
check(code == "InvalidBucketState", f"suspending a lock bucket: {code}")
s3.put_object_lock_configuration(Bucket=locked, ObjectLockConfiguration={
    "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
rule = s3.get_object_lock_configuration(Bucket=locked)["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]
check(rule["Mode"] == "GOVERNANCE" and rule["Days"] == 1, f"lock configuration {rule}")
until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)
vid = s3.put_object(Bucket=locked, Key="backup", Body=b"b", ObjectLockMode="COMPLIANCE",
                    ObjectLockRetainUntilDate=until)["VersionId"]
head = s3.head_object(Bucket=locked, Key="backup")
check(head.get("ObjectLockMode") == "COMPLIANCE", f"head lock {head}")
check(abs((head["ObjectLockRetainUntilDate"] - until).total_seconds()) < 2, f"retain until {head}")
retention = s3.get_object_retention(Bucket=locked, Key="backup", VersionId=vid)["Retention"]
check(retention["Mode"] == "COMPLIANCE", f"retention {retention}")
for bypass in (False, True):
    code, _ = error_code(s3.delete_object, Bucket=locked, Key="backup", VersionId=vid, BypassGovernanceRetention=bypass)
    check(code == "AccessDenied", f"delete of a COMPLIANCE version (bypass {bypass}): {code}")
code, _ = error_code(s3.put_object_retention, Bucket=locked, Key="backup", VersionId=vid,
                     Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until - datetime.timedelta(days=1)})
check(code == "AccessDenied", f"shortening COMPLIANCE retention: {code}")
s3.put_object_legal_hold(Bucket=locked, Key="backup", VersionId=vid, LegalHold={"Status": "ON"})
check(s3.get_object_legal_hold(Bucket=locked, Key="backup", VersionId=vid)["LegalHold"]["Status"] == "ON", "legal hold")
answer = s3.delete_objects(Bucket=locked, Delete={"Objects": [{"Key": "backup", "VersionId": vid}]})
check([e["Code"] for e in answer.get("Errors", [])] == ["AccessDenied"], f"batch delete of a locked version {answer}")
governed = s3.put_object(Bucket=locked, Key="governed", Body=b"g")["VersionId"]
check(s3.get_object_retention(Bucket=locked, Key="governed")["Retention"]["Mode"] == "GOVERNANCE", "default retention")
code, _ = error_code(s3.delete_object, Bucket=locked, Key="governed", VersionId=governed)
check(code == "AccessDenied", f"delete of a GOVERNANCE version without bypass: {code}")
s3.delete_object(Bucket=locked, Key="governed", VersionId=governed, BypassGovernanceRetention=True)
marker = s3.delete_object(Bucket=locked, Key="backup")
check(marker.get("DeleteMarker") is True, "a delete without version id leaves a marker")
check(s3.get_object(Bucket=locked, Key="backup", VersionId=vid)["Body"].read() == b"b", "locked version survives")
code, _ = error_code(s3.delete_bucket, Bucket=locked)
check(code == "BucketNotEmpty", f"delete of a bucket with a locked version: {code}")

s3.delete_object(Bucket=bucket, Key="small")
try:
    s3.head_object(Bucket=bucket, Key="small")
    check(False, "deleted object still there")
except ClientError as error:
    check(error.response["Error"]["Code"] in ("404", "NoSuchKey"), f"head after delete: {error.response}")
print("boto3 smoke: ok")
