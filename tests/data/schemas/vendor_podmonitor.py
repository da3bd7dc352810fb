"""Regenerate podmonitor-monitoring.coreos.com-v1.json from the npm registry.

    python tests/data/schemas/vendor_podmonitor.py     # needs npm; writes the JSON beside it

The schema is the object literal `schema` in monitoring.coreos.com/v1/PodMonitor.js of the
npm package below: the PodMonitor CRD's openAPIV3Schema as its generator (crd-generate)
publishes it. It is copied as it is; only a `$comment` naming its origin is added.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "@kubernetes-models/prometheus-operator@4.0.0"
MEMBER = "package/monitoring.coreos.com/v1/PodMonitor.js"
TARGET = Path(__file__).with_name("podmonitor-monitoring.coreos.com-v1.json")
COMMENT = (
    "The PodMonitor CRD schema of prometheus-operator v0.57.0 (Apache-2.0; "
    "example/prometheus-operator-crd-full/monitoring.coreos.com_podmonitors.yaml, "
    "spec.versions[v1].schema.openAPIV3Schema) as the npm package "
    f"{PACKAGE} (MIT) ships it in {MEMBER.removeprefix('package/')}: descriptions "
    "dropped, optional fields marked nullable, metadata a $ref to ObjectMeta. "
    "Regenerate with vendor_podmonitor.py beside this file; see README.md."
)


def _schema_literal(source: str) -> dict[str, Any]:
    start = source.index("const schema = ") + len("const schema = ")
    end = source.index("};\n", start) + 1
    schema: dict[str, Any] = json.loads(source[start:end])  # the literal is plain JSON
    return schema


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=scratch, check=True)
        (tarball,) = Path(scratch).glob("*.tgz")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile(MEMBER)
            assert member is not None, f"{MEMBER} missing from {PACKAGE}"
            source = member.read().decode("utf-8")
    vendored = {"$comment": COMMENT, **_schema_literal(source)}
    TARGET.write_text(json.dumps(vendored, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
