"""Shard datasets in S3-compatible object storage (`PATH.SHARDS_REMOTE: s3://bucket/prefix`).

    s3://bucket/prefix/<species>/<source>/<stem>/index.json, shard.NNNNN.mds[.zstd], dataset.json

The layout is the local one. A dataset is built locally first (staged under `PATH.SHARDS_PATH`)
and then uploaded with `dataset.json` LAST: object stores have no rename, so the presence of
`dataset.json` is what makes an uploaded dataset visible, exactly as on a filesystem. Re-uploading
over an older version deletes the old `dataset.json` FIRST, so a half-replaced dataset is never
visible either.

The endpoint comes from `S3_ENDPOINT_URL` (the variable mosaicml-streaming reads, so the sharder,
the catalog and streaming's downloads all talk to the same server); when it is unset boto3's own
configuration applies (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else AWS). Credentials come
from boto3's usual chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from .errors import ConfigError, ShardError, StorageError
from .finalize import species_index
from .integrity import INDEX_JSON
from .layout import decode_json, encode_json

DATASET_JSON = "dataset.json"


def endpoint_description() -> str:
    url = os.environ.get("S3_ENDPOINT_URL")
    return f"endpoint {url} (S3_ENDPOINT_URL)" if url else "the default AWS endpoint (S3_ENDPOINT_URL is not set)"


class RemoteShards:
    """One `s3://bucket/prefix` shard root: reads, uploads and lists datasets below it."""

    def __init__(self, url: str):
        parsed = urlparse(str(url))
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(
                "PATH.SHARDS_REMOTE",
                f"is `{url}`, not an s3://bucket/prefix URL.",
                "Set it to s3://<bucket>[/<prefix>] (any S3-compatible store, with S3_ENDPOINT_URL), "
                "or to null for local shards.",
            )
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = None

    # ---- addresses ---------------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}".lstrip("/") if rel else self.prefix

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # ---- client and errors -------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # few, quick retries: an unreachable endpoint should fail in seconds, not minutes
            config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=config
            )
        return self._client

    def error(self, exc: Exception, what: str) -> StorageError:
        """A StorageError naming the URL and what to do, for a botocore exception."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"PATH.SHARDS_REMOTE {self.url}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                where,
                f"no S3 credentials were found while trying to {what}.",
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment.",
            )
        if isinstance(exc, EndpointConnectionError):
            return StorageError(
                where,
                f"could not connect to {endpoint_description()} to {what} ({exc}).",
                "Check that the object store is running and reachable from this node, and that "
                "S3_ENDPOINT_URL is its URL (e.g. http://host:9000).",
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (code == "404" and what.startswith("check")):
                return StorageError(
                    where,
                    f"the bucket `{self.bucket}` does not exist at {endpoint_description()}.",
                    f"Create it (`aws s3 mb s3://{self.bucket}`, with --endpoint-url for a non-AWS "
                    "store) or fix PATH.SHARDS_REMOTE.",
                )
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(
                    where,
                    f"access was denied while trying to {what} ({code}).",
                    "Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket's permissions.",
                )
            return StorageError(
                where,
                f"the object store refused to {what} ({code}: {exc}).",
                "Check PATH.SHARDS_REMOTE, S3_ENDPOINT_URL and the credentials.",
            )
        return StorageError(
            where,
            f"failed to {what} ({type(exc).__name__}: {exc}).",
            "Check S3_ENDPOINT_URL, the network and the credentials, then re-run.",
        )

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, what) from None

    def check(self) -> None:
        """Raise a StorageError unless the bucket exists and is readable with these credentials."""
        self._call(f"check bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)

    # ---- reading -----------------------------------------------------------------------------
    def read_json(self, rel: str) -> dict | None:
        """The JSON object at `rel`, or None if there is none (or it is not valid JSON)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                return None
            raise self.error(exc, f"read {self.url_of(rel)}") from None
        except BotoCoreError as exc:
            raise self.error(exc, f"read {self.url_of(rel)}") from None
        try:
            return decode_json(body)
        except ValueError:
            return None

    def read_bytes(self, rel: str) -> bytes:
        """The object at `rel` (a StorageError naming it when it cannot be read)."""
        return self._call(
            f"read {self.url_of(rel)}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read(),
        )

    def list_keys(self, rel: str) -> list[str]:
        """Keys below `rel/`, relative to it."""
        base = self.key(rel).rstrip("/") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        out = []
        for page in self._call(f"list {self.url_of(rel)}", list, pages):
            out += [obj["Key"][len(base) :] for obj in page.get("Contents", [])]
        return sorted(out)

    def datasets(self, species: str) -> list[str]:
        """`<source>/<stem>` of every complete dataset of a species."""
        return sorted(
            k[: -len(DATASET_JSON) - 1]
            for k in self.list_keys(species)
            if k.endswith("/" + DATASET_JSON) and k.count("/") == 2
        )

    # ---- writing -----------------------------------------------------------------------------
    def put_json(self, rel: str, obj) -> None:
        body = encode_json(obj)
        self._call(
            f"write {self.url_of(rel)}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.key(rel),
            Body=body,
            ContentType="application/json",
        )

    def upload_dataset(self, local_dir: Path, rel: str) -> None:
        """Upload a complete local dataset to `rel/`: dataset.json deleted first, shards, index.json,
        objects of an older version that the new one lacks deleted, dataset.json last."""
        local_dir = Path(local_dir)
        names = sorted(p.name for p in local_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if DATASET_JSON not in names or INDEX_JSON not in names:
            raise ShardError(
                local_dir, "is not a complete dataset (no dataset.json or index.json).", "Re-run `concept-shard build`."
            )
        delete = self.client.delete_object
        self._call(
            f"delete {self.url_of(rel)}/{DATASET_JSON}",
            delete,
            Bucket=self.bucket,
            Key=self.key(f"{rel}/{DATASET_JSON}"),
        )
        old = set(self.list_keys(rel))
        order = [n for n in names if n not in (INDEX_JSON, DATASET_JSON)] + [INDEX_JSON]
        for name in order:
            self._call(
                f"upload {self.url_of(rel)}/{name}",
                self.client.upload_file,
                str(local_dir / name),
                self.bucket,
                self.key(f"{rel}/{name}"),
            )
        for name in sorted(old - set(names)):
            self._call(f"delete {self.url_of(rel)}/{name}", delete, Bucket=self.bucket, Key=self.key(f"{rel}/{name}"))
        self._call(
            f"upload {self.url_of(rel)}/{DATASET_JSON}",
            self.client.upload_file,
            str(local_dir / DATASET_JSON),
            self.bucket,
            self.key(f"{rel}/{DATASET_JSON}"),
        )

    def write_species_indexes(self, species: list[str]) -> dict[str, int]:
        """`<species>/index.json` and `datasets.json` over the species' complete remote datasets, as
        `finalize.write_species_indexes` does locally (stream a whole species with one Stream)."""
        counts = {}
        for sp in species:
            index, listed = species_index(sp, self._complete_datasets(sp))
            if listed["datasets"]:
                self.put_json(f"{sp}/{INDEX_JSON}", index)
                self.put_json(f"{sp}/datasets.json", listed)
            counts[sp] = len(listed["datasets"])
        return counts

    def _complete_datasets(self, species: str):
        """(`<source>/<stem>`, dataset.json, index.json) of each complete dataset of a species whose
        two files can be read, in order."""
        for rel in self.datasets(species):
            info = self.read_json(f"{species}/{rel}/{DATASET_JSON}")
            index = self.read_json(f"{species}/{rel}/{INDEX_JSON}")
            if info is not None and index is not None:
                yield rel, info, index
