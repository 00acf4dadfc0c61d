"""An offline renderer for the subset of kustomize that manifests/ uses.

CI has no kubectl or kustomize binary, yet the tests render every overlay to validate it.
This renderer implements exactly the features the manifests use, with kustomize v5's
semantics and order (patches, then namespace, labels, replicas, images), and raises
`KustomizeError` on anything else, so it never renders something different from
`kubectl kustomize` in silence (tests/test_deploy.py compares both where kubectl exists):

- `resources:` files (multi-document YAML) and directories with a kustomization.yaml;
- `components:` (kind Component), applied to everything accumulated so far;
- `namespace:`; `labels:` (pairs, `includeSelectors: false`, metadata.labels only);
- `images:` (name, newName, newTag, digest), on every `containers`/`initContainers` list;
- `replicas:` (Deployment, StatefulSet, ReplicaSet, ReplicationController);
- `patches:` (path or inline patch, optional target by group/version/kind/name/namespace):
  strategic-merge patches (maps merged, nulls delete, lists of containers, env, volumes, ...
  merged by their key, `$patch: delete` on a list item or a whole object) and JSON 6902
  patches (add, replace, remove).

YAML is read as kustomize's YAML 1.2 parser reads it where that is unambiguous; the scalars
that YAML 1.1 (PyYAML) reads otherwise (`yes`, `on`, `0755`, `1:30`, `1_000`) are errors:
quote them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "render", "render_yaml"]


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or is invalid."""


KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "labels",
                       "images", "replicas", "patches"}
_COMPONENT_KEYS = _KUSTOMIZATION_KEYS - {"namespace"}  # a component's namespace: not needed

# Kinds without a namespace; the namespace transformer leaves them alone.
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "PersistentVolume", "StorageClass",
                   "PriorityClass", "IngressClass", "RuntimeClass", "CSIDriver", "CSINode",
                   "Node", "VolumeAttachment"}
# Kinds where kustomize's namespace transformer edits more than metadata.namespace.
_NAMESPACE_UNSUPPORTED = {"ClusterRoleBinding", "ValidatingWebhookConfiguration",
                          "MutatingWebhookConfiguration", "APIService",
                          "CustomResourceDefinition"}
_REPLICA_KINDS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}
# Built-in kinds whose strategic-merge semantics (the lists below) are those of Kubernetes'
# own types; a strategic-merge patch of any other kind (a CRD) is refused.
_SMP_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod",
              "Service", "ConfigMap", "Secret", "ServiceAccount", "PersistentVolumeClaim",
              "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "Role",
              "RoleBinding", "PodDisruptionBudget"}
# Lists that a strategic merge merges item by item, by this key (core/v1 patchMergeKey).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
               "env": "name", "volumes": "name", "imagePullSecrets": "name",
               "resourceClaims": "name", "schedulingGates": "name",
               "volumeMounts": "mountPath"}
# Lists with merge semantics this renderer does not implement (keys differ by context, or
# merged primitive lists).
_MERGE_UNSUPPORTED = {"ports", "volumeDevices", "hostAliases", "topologySpreadConstraints",
                      "finalizers", "ownerReferences", "conditions", "podIPs", "hostIPs"}

_DELETE = object()


# --- YAML ------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing the plain scalars YAML 1.1 and 1.2 read differently."""


def _ambiguous(node: yaml.Node, what: str) -> KustomizeError:
    return KustomizeError(f"line {node.start_mark.line + 1}: plain scalar {node.value!r} is a "
                          f"{what} in YAML 1.1 but not in kustomize's YAML 1.2: quote it")


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    if node.value not in ("true", "True", "TRUE", "false", "False", "FALSE"):
        raise _ambiguous(node, "boolean")
    return node.value.lower() == "true"


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = node.value
    if "_" in value or ":" in value or re.fullmatch(r"[-+]?0[0-9]+", value) \
            or re.match(r"[-+]?0b", value):
        raise _ambiguous(node, "number")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    if "_" in node.value or ":" in node.value:
        raise _ambiguous(node, "number")
    return yaml.SafeLoader.construct_yaml_float(loader, node)


def _no_merge(loader: yaml.SafeLoader, node: yaml.Node) -> None:
    raise KustomizeError(f"line {node.start_mark.line + 1}: YAML merge keys (<<) unsupported")


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:merge", _no_merge)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _load_all(path: Path) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            return [doc for doc in yaml.load_all(fh, Loader=_Loader) if doc is not None]
    except KustomizeError as exc:
        raise KustomizeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{path}: invalid YAML: {exc}") from None


def _load_text(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except KustomizeError as exc:
        raise KustomizeError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{where}: invalid YAML: {exc}") from None


# --- resources -------------------------------------------------------------------------------

def _kustomization_file(directory: Path) -> Path:
    found = [directory / name for name in KUSTOMIZATION_FILES if (directory / name).is_file()]
    if len(found) != 1:
        raise KustomizeError(f"{directory}: expected exactly one of {KUSTOMIZATION_FILES}, "
                             f"found {len(found)}")
    return found[0]


def _res_id(obj: dict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""),
            meta.get("name", ""))


def _check_resource(obj: Any, where: Path) -> dict:
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind") \
            or not (obj.get("metadata") or {}).get("name"):
        raise KustomizeError(f"{where}: every resource needs apiVersion, kind and metadata.name")
    if obj["kind"].endswith("List") and "items" in obj:
        raise KustomizeError(f"{where}: List resources are not supported")
    if obj.get("apiVersion", "").startswith("kustomize.config.k8s.io/"):
        raise KustomizeError(f"{where}: a kustomization file listed as a resource")
    return obj


def _add_unique(accumulated: list[dict], new: list[dict], where: Path) -> None:
    seen = {_res_id(obj) for obj in accumulated}
    for obj in new:
        if _res_id(obj) in seen:
            raise KustomizeError(f"{where}: resource {_res_id(obj)} defined twice")
        seen.add(_res_id(obj))
        accumulated.append(obj)


def _build(directory: Path, expected_kind: str, stack: tuple[Path, ...],
           accumulated: list[dict] | None = None) -> list[dict]:
    directory = directory.resolve()
    if directory in stack:
        raise KustomizeError(f"{directory}: cycle in resources/components")
    stack = (*stack, directory)
    kfile = _kustomization_file(directory)
    docs = _load_all(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise KustomizeError(f"{kfile}: expected one mapping")
    kust = docs[0]
    kind = kust.get("kind", "Kustomization")
    if kind != expected_kind:
        raise KustomizeError(f"{kfile}: kind {kind}, expected {expected_kind} here")
    expected_api = ("kustomize.config.k8s.io/v1alpha1" if kind == "Component"
                    else "kustomize.config.k8s.io/v1beta1")
    if kust.get("apiVersion", expected_api) != expected_api:
        raise KustomizeError(f"{kfile}: apiVersion {kust.get('apiVersion')} unsupported")
    allowed = _COMPONENT_KEYS if kind == "Component" else _KUSTOMIZATION_KEYS
    unknown = set(kust) - allowed
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported kustomization keys {sorted(unknown)}")

    # A Kustomization starts from nothing; a Component adds to (and transforms) its parent's.
    resources: list[dict] = [] if accumulated is None else accumulated
    for entry in _as_list(kust.get("resources"), "resources", kfile):
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com",
                                                                               "git@")):
            raise KustomizeError(f"{kfile}: resource {entry!r}: only local paths supported")
        target = directory / entry
        if target.is_dir():
            _add_unique(resources, _build(target, "Kustomization", stack), kfile)
        elif target.is_file():
            _add_unique(resources, [_check_resource(copy.deepcopy(doc), target)
                                    for doc in _load_all(target)], kfile)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} not found")
    for entry in _as_list(kust.get("components"), "components", kfile):
        target = directory / str(entry)
        if not target.is_dir():
            raise KustomizeError(f"{kfile}: component {entry!r} is not a directory")
        resources = _build(target, "Component", stack, resources)

    # kustomize's built-in transformer order (api/internal/target/kusttarget_configplugin.go).
    resources = _apply_patches(resources, kust.get("patches"), directory, kfile)
    if "namespace" in kust:
        _apply_namespace(resources, kust["namespace"], kfile)
    if "labels" in kust:
        _apply_labels(resources, kust["labels"], kfile)
    if "replicas" in kust:
        _apply_replicas(resources, kust["replicas"], kfile)
    if "images" in kust:
        _apply_images(resources, kust["images"], kfile)
    return resources


def _as_list(value: Any, key: str, where: Path) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise KustomizeError(f"{where}: {key} must be a list")
    return value


# --- namespace, labels, replicas, images ------------------------------------------------------

def _apply_namespace(resources: list[dict], namespace: Any, where: Path) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise KustomizeError(f"{where}: namespace must be a non-empty string")
    for obj in resources:
        kind = obj["kind"]
        if kind in _NAMESPACE_UNSUPPORTED:
            raise KustomizeError(f"{where}: namespace transformer on {kind} unsupported")
        if kind in _CLUSTER_SCOPED:
            continue
        obj["metadata"]["namespace"] = namespace
        if kind == "RoleBinding":
            # kustomize rewrites ServiceAccount subjects under rules this renderer does not
            # reproduce; subjects already in the namespace are left as they are by both.
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" \
                        and subject.get("namespace") != namespace:
                    raise KustomizeError(f"{where}: RoleBinding {obj['metadata']['name']}: "
                                         f"set subject namespace {namespace} explicitly")


def _apply_labels(resources: list[dict], entries: Any, where: Path) -> None:
    for entry in _as_list(entries, "labels", where):
        if not isinstance(entry, dict) or set(entry) - {"pairs", "includeSelectors"}:
            raise KustomizeError(f"{where}: labels entries support only pairs and "
                                 f"includeSelectors: false")
        if entry.get("includeSelectors", False) is not False:
            raise KustomizeError(f"{where}: labels includeSelectors: true unsupported")
        pairs = entry.get("pairs") or {}
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise KustomizeError(f"{where}: labels pairs must map strings to strings")
        for obj in resources:
            labels = obj["metadata"].get("labels")
            if labels is None:
                labels = obj["metadata"]["labels"] = {}
            labels.update(pairs)


def _apply_replicas(resources: list[dict], entries: Any, where: Path) -> None:
    for entry in _as_list(entries, "replicas", where):
        if not isinstance(entry, dict) or set(entry) != {"name", "count"} \
                or not isinstance(entry["count"], int) or isinstance(entry["count"], bool):
            raise KustomizeError(f"{where}: replicas entries need name and an integer count")
        matched = [obj for obj in resources if obj["kind"] in _REPLICA_KINDS
                   and obj["metadata"]["name"] == entry["name"]]
        if not matched:
            raise KustomizeError(f"{where}: replicas: no workload named {entry['name']!r}")
        for obj in matched:
            obj.setdefault("spec", {})["replicas"] = entry["count"]


def split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest of an image reference (a registry port is part of the name)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def _apply_images(resources: list[dict], entries: Any, where: Path) -> None:
    specs = _as_list(entries, "images", where)
    for spec in specs:
        if not isinstance(spec, dict) or "name" not in spec \
                or set(spec) - {"name", "newName", "newTag", "digest"}:
            raise KustomizeError(f"{where}: images entries support name, newName, newTag, "
                                 f"digest")
        for key in spec:
            if not isinstance(spec[key], str):
                raise KustomizeError(f"{where}: images {key} must be a string (quote it)")

    def update(image: str) -> str:
        for spec in specs:
            if not (image == spec["name"] or image.startswith((spec["name"] + ":",
                                                               spec["name"] + "@"))):
                continue
            name, tag, digest = split_image(image)
            name = spec.get("newName") or name
            if spec.get("newTag") and spec.get("digest"):
                tag, digest = spec["newTag"], spec["digest"]
            elif spec.get("newTag"):
                tag, digest = spec["newTag"], ""
            elif spec.get("digest"):
                tag, digest = "", spec["digest"]
            return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        return image

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"),
                                                                      str):
                            container["image"] = update(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in resources:
        walk(obj)


# --- patches ---------------------------------------------------------------------------------

def _apply_patches(resources: list[dict], entries: Any, directory: Path,
                   where: Path) -> list[dict]:
    for index, entry in enumerate(_as_list(entries, "patches", where)):
        label = f"{where}: patches[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"path", "patch", "target"} \
                or ("path" in entry) == ("patch" in entry):
            raise KustomizeError(f"{label}: needs exactly one of path/patch, optional target")
        if "path" in entry:
            text = (directory / entry["path"]).read_text(encoding="utf-8")
        else:
            text = entry["patch"]
        patch = _load_text(text, label)
        target = entry.get("target")
        if target is not None:
            matches = _select(resources, target, label)
        elif isinstance(patch, dict):
            matches = [obj for obj in resources if _same_object(obj, patch)]
        else:
            raise KustomizeError(f"{label}: a JSON 6902 patch needs a target")
        if not matches:
            raise KustomizeError(f"{label}: matches no resource")
        if isinstance(patch, list):
            for obj in matches:
                _json6902(obj, patch, label)
        elif isinstance(patch, dict):
            for obj in matches:
                if obj["kind"] not in _SMP_KINDS:
                    raise KustomizeError(f"{label}: strategic merge of kind {obj['kind']} "
                                         f"unsupported (use a JSON 6902 patch)")
                merged = _smp_map(obj, patch, label)
                if merged is _DELETE:
                    resources = [other for other in resources if other is not obj]
                else:
                    obj.clear()
                    obj.update(merged)
        else:
            raise KustomizeError(f"{label}: a patch is a mapping or a list of operations")
    return resources


def _same_object(obj: dict, patch: dict) -> bool:
    """A patch without a target applies to the object of its own id (kustomize: an empty
    namespace and `default` are the same)."""
    meta = patch.get("metadata") or {}

    def ns(value: Any) -> str:
        return "" if value in (None, "", "default") else value

    return (obj["apiVersion"] == patch.get("apiVersion") and obj["kind"] == patch.get("kind")
            and obj["metadata"]["name"] == meta.get("name")
            and ns(obj["metadata"].get("namespace")) == ns(meta.get("namespace")))


def _select(resources: list[dict], target: Any, label: str) -> list[dict]:
    if not isinstance(target, dict) or set(target) - {"group", "version", "kind", "name",
                                                      "namespace"}:
        raise KustomizeError(f"{label}: target supports group, version, kind, name, namespace")
    selected = []
    for obj in resources:
        group, _, version = obj["apiVersion"].rpartition("/")
        meta = obj["metadata"]
        if "group" in target and target["group"] != group:
            continue
        if "version" in target and target["version"] != version:
            continue
        if "kind" in target and target["kind"] != obj["kind"]:
            continue
        # kustomize anchors name and namespace as regular expressions.
        if "name" in target and not re.fullmatch(target["name"], meta["name"]):
            continue
        if "namespace" in target and not re.fullmatch(target["namespace"],
                                                      meta.get("namespace", "")):
            continue
        selected.append(obj)
    return selected


def _smp_map(base: dict, patch: dict, label: str) -> Any:
    directive = patch.get("$patch")
    if directive is not None:
        if directive == "delete":
            return _DELETE
        raise KustomizeError(f"{label}: $patch: {directive} unsupported")
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"{label}: directive {key} unsupported")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = _smp_map(result.get(key) if isinstance(result.get(key), dict) else {},
                              value, label)
            if merged is _DELETE:
                raise KustomizeError(f"{label}: $patch: delete on map {key} unsupported")
            result[key] = merged
        elif isinstance(value, list):
            result[key] = _smp_list(key, result.get(key), value, label)
        else:
            result[key] = value
    return result


def _smp_list(key: str, base: Any, patch: list, label: str) -> list:
    if key in _MERGE_UNSUPPORTED:
        raise KustomizeError(f"{label}: strategic merge of list {key} unsupported")
    merge_key = _MERGE_KEYS.get(key)
    if merge_key is None:
        if any(isinstance(item, dict) and any(k.startswith("$") for k in item)
               for item in patch):
            raise KustomizeError(f"{label}: directives in list {key} unsupported")
        return copy.deepcopy(patch)  # lists without a merge strategy are replaced
    # kustomize (kyaml's merge2) orders the result as the patch lists its items, then the
    # remaining items of the original in their order.
    original = copy.deepcopy(base) if isinstance(base, list) else []
    by_key = {old.get(merge_key): old for old in original if isinstance(old, dict)}
    merged_items: list = []
    patched_keys = set()
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"{label}: items of {key} need {merge_key}")
        if item[merge_key] in patched_keys:
            raise KustomizeError(f"{label}: {key} item {item[merge_key]!r} patched twice")
        patched_keys.add(item[merge_key])
        if item.get("$patch") == "delete":
            if set(item) != {merge_key, "$patch"}:
                raise KustomizeError(f"{label}: a $patch: delete item holds only {merge_key}")
            continue
        old = by_key.get(item[merge_key])
        if key == "volumes" and old is not None and set(item) - set(old):
            # volumes merge with retainKeys: a new source replaces the old one.
            raise KustomizeError(f"{label}: changing the source of volume "
                                 f"{item[merge_key]!r} unsupported")
        merged_items.append(_smp_map(old or {}, item, label))
    rest = [old for old in original
            if not (isinstance(old, dict) and old.get(merge_key) in patched_keys)]
    return merged_items + rest


def _pointer(path: Any, label: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise KustomizeError(f"{label}: JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json6902(obj: dict, operations: list, label: str) -> None:
    for op in operations:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
            raise KustomizeError(f"{label}: only add, replace and remove operations supported")
        allowed = {"op", "path"} | ({"value"} if op["op"] != "remove" else set())
        if set(op) != allowed:
            raise KustomizeError(f"{label}: operation {op} needs exactly {sorted(allowed)}")
        parts = _pointer(op["path"], label)
        parent: Any = obj
        for part in parts[:-1]:
            parent = _child(parent, part, op, label)
        last = parts[-1]
        value = copy.deepcopy(op.get("value"))
        if isinstance(parent, dict):
            if op["op"] != "add" and last not in parent:
                raise KustomizeError(f"{label}: {op['path']} does not exist")
            if op["op"] == "remove":
                del parent[last]
            else:
                parent[last] = value
        elif isinstance(parent, list):
            if op["op"] == "add" and last == "-":
                parent.append(value)
                continue
            index = _index(last, op, label)
            limit = len(parent) + (1 if op["op"] == "add" else 0)
            if index >= limit:
                raise KustomizeError(f"{label}: {op['path']} is out of range")
            if op["op"] == "add":
                parent.insert(index, value)
            elif op["op"] == "replace":
                parent[index] = value
            else:
                del parent[index]
        else:
            raise KustomizeError(f"{label}: {op['path']}: parent is not a map or list")


def _index(part: str, op: dict, label: str) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", part):
        raise KustomizeError(f"{label}: {op['path']}: {part!r} is not a list index")
    return int(part)


def _child(node: Any, part: str, op: dict, label: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list):
        index = _index(part, op, label)
        if index < len(node):
            return node[index]
    raise KustomizeError(f"{label}: {op['path']} does not exist")


# --- entry points ----------------------------------------------------------------------------

def render(path: Path | str) -> list[dict]:
    """The resources `kubectl kustomize <path>` builds, as dicts, in load order."""
    return _build(Path(path), "Kustomization", ())


def render_yaml(path: Path | str) -> str:
    """`render` as one multi-document YAML stream (what `kubectl apply -f -` reads)."""
    return yaml.safe_dump_all(render(path), sort_keys=False, default_flow_style=False)
