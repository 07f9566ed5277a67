"""Where this process runs, when it was launched onto a cluster: the `where` of every ledger entry.

`trulyopen launch` starts runs on SkyPilot clusters (clouds, Kubernetes) and under Slurm. Neither
tells the run where it is in one place, so this reads what each of them leaves in the environment:

    SkyPilot   SKYPILOT_CLUSTER_INFO  {"cluster_name", "cloud", "region", "zone"}   (JSON)
               SKYPILOT_TASK_ID       the job's id;  SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK
    Slurm      SLURM_JOB_ID, SLURM_CLUSTER_NAME, SLURM_JOB_PARTITION, SLURM_JOB_NODELIST, SLURM_NNODES
    launch     TRULYOPEN_LAUNCH_NAME, _ACCELERATORS (what was asked for: `--gpus`), _SPOT

The instance type is not in SkyPilot's variables: the cloud's own metadata server knows it (AWS,
GCP, Azure; a second at most, asked once a process). A run started by hand has no `where`.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.request
from typing import Any

# The clouds' instance metadata services: (URL path, headers); a token first for AWS (IMDSv2).
METADATA = "http://169.254.169.254"  # TRULYOPEN_METADATA_URL replaces it (a test's server)
_INSTANCE_TYPE = {
    "aws": ("/latest/meta-data/instance-type", {}),
    "gcp": ("/computeMetadata/v1/instance/machine-type", {"Metadata-Flavor": "Google"}),
    "azure": ("/metadata/instance/compute/vmSize?api-version=2021-02-01&format=text", {"Metadata": "true"}),
}


def where() -> dict[str, Any] | None:
    """Provider, region, zone, cluster, job id, nodes, accelerators and instance type; None when
    this process was not launched onto a cluster."""
    env = os.environ
    out: dict[str, Any] = {}
    if "SKYPILOT_CLUSTER_INFO" in env or "SKYPILOT_TASK_ID" in env:
        try:
            info = json.loads(env.get("SKYPILOT_CLUSTER_INFO") or "{}")
        except json.JSONDecodeError:
            info = {}
        cloud = str(info.get("cloud") or "").lower() or None
        out = {
            "launcher": "skypilot",
            "provider": cloud,
            "region": info.get("region"),
            "zone": info.get("zone"),
            "cluster": info.get("cluster_name"),
            "job_id": env.get("SKYPILOT_TASK_ID"),
            "nodes": _int(env.get("SKYPILOT_NUM_NODES")),
            "instance_type": instance_type(cloud) if cloud else None,
        }
    elif "SLURM_JOB_ID" in env:
        out = {
            "launcher": "slurm",
            "provider": "slurm",
            "cluster": env.get("SLURM_CLUSTER_NAME"),
            "partition": env.get("SLURM_JOB_PARTITION"),
            "job_id": env["SLURM_JOB_ID"],
            "nodes": _int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")),
            "nodelist": env.get("SLURM_JOB_NODELIST"),
        }
    if not out:
        return None
    out["name"] = env.get("TRULYOPEN_LAUNCH_NAME")
    out["accelerators"] = env.get("TRULYOPEN_LAUNCH_ACCELERATORS")
    if "TRULYOPEN_LAUNCH_SPOT" in env:
        out["spot"] = env["TRULYOPEN_LAUNCH_SPOT"] == "1"
    return {k: v for k, v in out.items() if v is not None}


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


@functools.cache
def instance_type(cloud: str) -> str | None:
    """The instance (machine) type from the cloud's metadata server; None elsewhere or unanswered."""
    if cloud not in _INSTANCE_TYPE:
        return None
    base = os.environ.get("TRULYOPEN_METADATA_URL", METADATA).rstrip("/")
    path, headers = _INSTANCE_TYPE[cloud]
    try:
        if cloud == "aws":  # IMDSv2: a session token first
            put = urllib.request.Request(
                base + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            )
            with urllib.request.urlopen(put, timeout=1) as r:
                headers = {"X-aws-ec2-metadata-token": r.read().decode()}
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=1) as r:
            value = r.read().decode().strip()
    except OSError:
        return None
    return value.rsplit("/", 1)[-1] or None  # GCP answers projects/N/machineTypes/a3-highgpu-8g
