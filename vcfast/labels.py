"""Multi-group partial domain labels and StarGAN target sampling (docs/labels.md).

A *label space* is an ordered list of groups (default: speaker 1421, birthplace 53, sex 2).
Every utterance has, per group, a class index or *unknown*. Three vector forms exist:

=================== ====================== ==================================================
form                width (default)        content
=================== ====================== ==================================================
indices             ``n_groups`` (3)       class index per group, ``-1`` = unknown (long)
generator input     ``input_dim`` (1479)   one-hot per group (all zeros where unknown), then
                                           ``n_groups`` flags, 1 where the group is known
classifier target   ``n_classes`` (1476)   one-hot per group; every entry of an unknown group
                                           is ``-1`` (ignored by the classification loss)
=================== ====================== ==================================================

Per-sample labels are accepted as

* a list of dicts ``{group_name: index | class_name | None}`` (missing key = unknown),
* a list of tuples/lists in group order (``None`` or ``-1`` = unknown, names allowed),
* an integer tensor (or numpy array) ``[N, G]`` with ``-1`` = unknown.

All three give identical tensors. The tensor maths is vectorised over the batch; the only
Python loops are over groups (and, for list input, over the samples while parsing them).

Example::

    space = LabelSpace()                         # speaker 1421, birthplace 53, sex 2
    c = space.generator_input([{"speaker": 7, "sex": 1}, (None, 3, None)])   # [2, 1479]
    t = space.classifier_target(torch.tensor([[7, -1, 1]]))                  # [1, 1476] int8
    target_idx, perm = space.sample_targets(space.encode_indices(labels), return_perm=True)
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["DEFAULT_GROUPS", "LabelSpace", "derangement"]

#: The default groups (docs/labels.md#groups).
DEFAULT_GROUPS: tuple[tuple[str, int], ...] = (("speaker", 1421), ("birthplace", 53), ("sex", 2))

UNKNOWN = -1
_STRATEGIES = ("shuffle", "uniform")
_MAX_DERANGEMENT_TRIES = 64


def derangement(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``p[i] != i``).

    Rejection sampling of ``torch.randperm``: a random permutation is a derangement with
    probability ~1/e, so this takes ~2.7 draws on average. After 64 failed draws (probability
    < 1e-12) it falls back to a random single cycle, still a derangement. ``n == 1`` has no
    derangement and returns ``[0]``; ``n == 0`` returns an empty tensor. Deterministic given
    ``generator``. The permutation is drawn on the generator's device and moved to ``device``.
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"derangement: n must be >= 0, got {n}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out_device = torch.device(device) if device is not None else gen_device
    if n <= 1:
        return torch.arange(n, device=out_device)
    ar = torch.arange(n, device=gen_device)
    for _ in range(_MAX_DERANGEMENT_TRIES):
        p = torch.randperm(n, generator=generator, device=gen_device)
        if not bool((p == ar).any()):
            return p.to(out_device)
    # Fallback: follow a random order as one n-cycle, sigma[j] -> sigma[j + 1].
    sigma = torch.randperm(n, generator=generator, device=gen_device)
    p = torch.empty_like(sigma)
    p[sigma] = sigma.roll(-1)
    return p.to(out_device)


def _onehot_segments_to_indices(
    segments: Sequence[torch.Tensor], names: Sequence[str], what: str
) -> torch.Tensor:
    """Classifier-target segments (one-hot, or all -1 for unknown) -> [N, G] long indices.

    Raises ValueError naming the group and the first bad sample when a segment is neither
    all -1 nor a 0/1 one-hot.
    """
    cols = []
    for seg, name in zip(segments, names):
        is_neg = seg == -1
        unknown = is_neg.all(dim=1)
        is_one = seg == 1
        ok_values = is_one | (seg == 0)
        known_ok = ok_values.all(dim=1) & (is_one.sum(dim=1) == 1)
        bad = ~(unknown | known_ok)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            row = seg[i]
            raise ValueError(
                f"{what}: group '{name}' of sample {i} is neither all -1 (unknown) nor a "
                f"one-hot of 0/1 (values {_preview_values(row)})"
            )
        idx = is_one.to(torch.uint8).argmax(dim=1)
        cols.append(torch.where(unknown, torch.full_like(idx, UNKNOWN), idx))
    if not cols:
        return torch.empty(0, 0, dtype=torch.long)
    return torch.stack(cols, dim=1).to(torch.long)


def _preview_values(row: torch.Tensor, limit: int = 6) -> str:
    vals = torch.unique(row.detach().cpu()).tolist()
    head = ", ".join(repr(v) for v in vals[:limit])
    return "{" + head + (", ..." if len(vals) > limit else "") + "}"


class LabelSpace:
    """An ordered set of label groups with optional class names. Immutable and hashable.

    Args:
        groups: sequence of ``(name, size)`` pairs; default :data:`DEFAULT_GROUPS`
            (speaker 1421, birthplace 53, sex 2). Names must be unique non-empty strings,
            sizes integers >= 1.
        class_names: optional mapping ``group name -> sequence of class names`` (length =
            group size, unique strings). Groups absent from it have no names; their classes
            are addressed by index only. :meth:`from_names` is the usual way to build this.
    """

    __slots__ = ("_names", "_sizes", "_offsets", "_class_names", "_name_to_group", "_lookup")

    def __init__(
        self,
        groups: Sequence[tuple[str, int]] | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if groups is None:
            groups = DEFAULT_GROUPS
        if isinstance(groups, Mapping):
            groups = list(groups.items())
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise TypeError(
                f"LabelSpace: groups must be a sequence of (name, size) pairs, got "
                f"{type(groups).__name__}"
            )
        if len(groups) == 0:
            raise ValueError("LabelSpace: groups is empty; need at least one (name, size) pair")
        names: list[str] = []
        sizes: list[int] = []
        for k, g in enumerate(groups):
            if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) != 2:
                raise TypeError(
                    f"LabelSpace: group {k} must be a (name, size) pair, got {g!r}"
                )
            name, size = g
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"LabelSpace: group {k} name must be a non-empty str, got {name!r}"
                )
            if name in names:
                raise ValueError(f"LabelSpace: duplicate group name '{name}' in {list(groups)!r}")
            if isinstance(size, bool):
                raise TypeError(f"LabelSpace: size of group '{name}' must be an int, got {size!r}")
            try:
                size = operator.index(size)
            except TypeError:
                raise TypeError(
                    f"LabelSpace: size of group '{name}' must be an int, got {size!r}"
                ) from None
            if size < 1:
                raise ValueError(f"LabelSpace: size of group '{name}' must be >= 1, got {size}")
            names.append(name)
            sizes.append(size)

        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)

        cn: list[tuple[str, ...] | None] = [None] * len(names)
        lookup: list[dict[str, int] | None] = [None] * len(names)
        if class_names is not None:
            if not isinstance(class_names, Mapping):
                raise TypeError("LabelSpace: class_names must be a mapping group -> names")
            for gname, cls in class_names.items():
                if gname not in names:
                    raise ValueError(
                        f"LabelSpace: class_names given for unknown group '{gname}'; "
                        f"groups are {names}"
                    )
                if cls is None:
                    continue
                k = names.index(gname)
                if isinstance(cls, (str, bytes)) or not isinstance(cls, Sequence):
                    raise TypeError(
                        f"LabelSpace: class names of group '{gname}' must be a list of str"
                    )
                cls = tuple(cls)
                if len(cls) != sizes[k]:
                    raise ValueError(
                        f"LabelSpace: group '{gname}' has size {sizes[k]} but {len(cls)} "
                        f"class names"
                    )
                for c in cls:
                    if not isinstance(c, str):
                        raise TypeError(
                            f"LabelSpace: class names of group '{gname}' must be str, got {c!r}"
                        )
                table = {c: i for i, c in enumerate(cls)}
                if len(table) != len(cls):
                    dup = next(c for c in cls if cls.count(c) > 1)
                    raise ValueError(
                        f"LabelSpace: duplicate class name '{dup}' in group '{gname}'"
                    )
                cn[k] = cls
                lookup[k] = table

        self._names = tuple(names)
        self._sizes = tuple(sizes)
        self._offsets = tuple(offsets)
        self._class_names = tuple(cn)
        self._lookup = tuple(lookup)
        self._name_to_group = {n: k for k, n in enumerate(names)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_names(cls, class_names: Mapping[str, Sequence[str]]) -> LabelSpace:
        """Build from an ordered mapping ``group -> list of class names`` (sizes = lengths).

        ``LabelSpace.from_names({"speaker": ["p225", "p226"], "accent": [...], "sex": ["F", "M"]})``
        """
        if not isinstance(class_names, Mapping):
            raise TypeError("LabelSpace.from_names: expected a mapping group -> list of names")
        groups = []
        for g, cls_ in class_names.items():
            if isinstance(cls_, (str, bytes)) or not isinstance(cls_, Sequence):
                raise TypeError(
                    f"LabelSpace.from_names: class names of group '{g}' must be a list of str"
                )
            groups.append((g, len(cls_)))
        return cls(groups, class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, for checkpoints; :meth:`from_dict` inverts it."""
        d: dict[str, Any] = {"groups": [[n, s] for n, s in zip(self._names, self._sizes)]}
        named = {n: list(c) for n, c in zip(self._names, self._class_names) if c is not None}
        if named:
            d["class_names"] = named
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelSpace:
        if not isinstance(d, Mapping) or "groups" not in d:
            raise ValueError("LabelSpace.from_dict: expected a mapping with a 'groups' entry")
        return cls([tuple(g) for g in d["groups"]], d.get("class_names"))

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def sizes(self) -> tuple[int, ...]:
        """Group sizes; usable directly as the ``groups`` argument of the loss ops."""
        return self._sizes

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start column of each group's one-hot in the classifier target / generator input."""
        return self._offsets

    @property
    def n_groups(self) -> int:
        return len(self._sizes)

    @property
    def n_classes(self) -> int:
        """Width of the classifier target (sum of sizes): 1476 by default."""
        return sum(self._sizes)

    @property
    def input_dim(self) -> int:
        """Width of the generator label input (one-hots + known flags): 1479 by default."""
        return self.n_classes + self.n_groups

    def __len__(self) -> int:
        return self.n_groups

    def group_index(self, group: str | int) -> int:
        """Position of a group given by name or position."""
        if isinstance(group, str):
            try:
                return self._name_to_group[group]
            except KeyError:
                raise ValueError(
                    f"unknown label group '{group}'; groups are {list(self._names)}"
                ) from None
        if isinstance(group, bool):
            raise TypeError(f"group must be a name or an int position, got {group!r}")
        k = operator.index(group)
        if not 0 <= k < self.n_groups:
            raise ValueError(f"group position {k} out of range [0, {self.n_groups})")
        return k

    def size_of(self, group: str | int) -> int:
        return self._sizes[self.group_index(group)]

    def class_names(self, group: str | int) -> tuple[str, ...] | None:
        """Class names of a group, or ``None`` if the group was built without names."""
        return self._class_names[self.group_index(group)]

    def index_of(self, group: str | int, name: str | int) -> int:
        """Class index of ``name`` in ``group``.

        ``name`` may be a class name, an int index, or (for groups without names) a decimal
        string. Unknown names raise ValueError listing a few valid (or similar) names, e.g.
        ``unknown speaker 'p999' (2 classes; did you mean 'p299'? valid: 'p225', ...)``.
        """
        k = self.group_index(group)
        gname, size = self._names[k], self._sizes[k]
        if isinstance(name, str):
            table = self._lookup[k]
            if table is not None:
                if name in table:
                    return table[name]
                raise ValueError(f"unknown {gname} {name!r} ({self._valid_hint(k, name)})")
            if name.strip().lstrip("-").isdigit():
                return self._check_index(k, int(name))
            raise ValueError(
                f"unknown {gname} {name!r}: group '{gname}' has no class names, "
                f"use an index in [0, {size})"
            )
        if isinstance(name, bool):
            raise TypeError(f"{gname}: class must be a name or an int index, got {name!r}")
        try:
            idx = operator.index(name)
        except TypeError:
            raise TypeError(
                f"{gname}: class must be a name or an int index, got {type(name).__name__}"
            ) from None
        return self._check_index(k, idx)

    def name_of(self, group: str | int, index: int) -> str | int:
        """Class name of ``index`` in ``group`` (the index itself if the group has no names)."""
        k = self.group_index(group)
        idx = self._check_index(k, operator.index(index))
        cn = self._class_names[k]
        return cn[idx] if cn is not None else idx

    def _check_index(self, k: int, idx: int) -> int:
        if not 0 <= idx < self._sizes[k]:
            raise ValueError(
                f"{self._names[k]} index {idx} out of range [0, {self._sizes[k]})"
            )
        return idx

    def _valid_hint(self, k: int, name: str, n_show: int = 5) -> str:
        cn = self._class_names[k]
        assert cn is not None
        parts = [f"{len(cn)} classes"]
        close = difflib.get_close_matches(name, cn, n=3)
        if close:
            parts.append("did you mean " + " or ".join(repr(c) for c in close) + "?")
        shown = ", ".join(repr(c) for c in cn[:n_show])
        parts.append(f"valid: {shown}" + (", ..." if len(cn) > n_show else ""))
        return "; ".join(parts)

    # ------------------------------------------------------------------ dunder
    def __repr__(self) -> str:
        body = ", ".join(f"{n}={s}" for n, s in zip(self._names, self._sizes))
        named = [n for n, c in zip(self._names, self._class_names) if c is not None]
        extra = f", named={named}" if named else ""
        return f"LabelSpace({body}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSpace):
            return NotImplemented
        return (
            self._names == other._names
            and self._sizes == other._sizes
            and self._class_names == other._class_names
        )

    def __hash__(self) -> int:
        return hash((self._names, self._sizes, self._class_names))

    # ------------------------------------------------------------------ parsing
    def encode_indices(self, labels: Any) -> torch.Tensor:
        """Per-sample partial labels -> LongTensor ``[N, G]`` with ``-1`` for unknown.

        Accepts a list of dicts, a list of tuples/lists in group order, or an integer tensor
        / numpy array ``[N, G]``. Out-of-range values raise ValueError naming the group, the
        sample and the value. A tensor input keeps its device; the result never aliases it.
        """
        if isinstance(labels, torch.Tensor) or _is_array(labels):
            return self._encode_tensor(torch.as_tensor(labels))
        if isinstance(labels, Mapping):
            raise TypeError(
                "encode_indices: expected a list of samples, got a single dict; "
                "wrap it in a list: [labels]"
            )
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(
                "encode_indices: labels must be a list of dicts, a list of tuples/lists in "
                f"group order, or an integer tensor [N, {self.n_groups}]; "
                f"got {type(labels).__name__}"
            )
        rows = [self._parse_sample(i, s) for i, s in enumerate(labels)]
        if not rows:
            return torch.empty(0, self.n_groups, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def _encode_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(
                f"encode_indices: label tensor must have an integer dtype, got {t.dtype}"
            )
        if t.dim() != 2 or t.shape[1] != self.n_groups:
            raise ValueError(
                f"encode_indices: label tensor must have shape [N, {self.n_groups}] "
                f"(groups {list(self._names)}), got {list(t.shape)}"
            )
        t = t.to(torch.long, copy=True)
        sizes = torch.tensor(self._sizes, dtype=torch.long, device=t.device)
        bad = (t < UNKNOWN) | (t >= sizes)
        if bool(bad.any()):
            i, k = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"encode_indices: sample {i}, group '{self._names[k]}': value {int(t[i, k])} "
                f"out of range (valid: 0..{self._sizes[k] - 1}, or -1 for unknown)"
            )
        return t

    def _parse_sample(self, i: int, sample: Any) -> list[int]:
        out = [UNKNOWN] * self.n_groups
        if isinstance(sample, Mapping):
            for key, value in sample.items():
                if key not in self._name_to_group:
                    raise ValueError(
                        f"encode_indices: sample {i} has unknown group {key!r}; "
                        f"groups are {list(self._names)}"
                    )
                k = self._name_to_group[key]
                out[k] = self._parse_value(i, k, value)
            return out
        if isinstance(sample, torch.Tensor) and sample.dim() == 1:
            sample = sample.tolist()
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
            raise TypeError(
                f"encode_indices: sample {i} must be a dict or a tuple/list in group order, "
                f"got {type(sample).__name__}"
            )
        if len(sample) != self.n_groups:
            raise ValueError(
                f"encode_indices: sample {i} has {len(sample)} entries, expected "
                f"{self.n_groups} (groups {list(self._names)})"
            )
        return [self._parse_value(i, k, v) for k, v in enumerate(sample)]

    def _parse_value(self, i: int, k: int, value: Any) -> int:
        if value is None:
            return UNKNOWN
        gname = self._names[k]
        if isinstance(value, str):
            try:
                return self.index_of(k, value)
            except ValueError as e:
                raise ValueError(f"encode_indices: sample {i}, group '{gname}': {e}") from None
        if isinstance(value, bool):
            raise TypeError(
                f"encode_indices: sample {i}, group '{gname}': got bool {value!r}, "
                f"expected an index, a class name or None"
            )
        try:
            idx = operator.index(value)
        except TypeError:
            raise TypeError(
                f"encode_indices: sample {i}, group '{gname}': expected an index, a class name "
                f"or None, got {type(value).__name__}"
            ) from None
        if idx == UNKNOWN:
            return UNKNOWN
        if not 0 <= idx < self._sizes[k]:
            raise ValueError(
                f"encode_indices: sample {i}, group '{gname}': value {idx} out of range "
                f"(valid: 0..{self._sizes[k] - 1}, or -1/None for unknown)"
            )
        return idx

    # ------------------------------------------------------------------ encoding
    def generator_input(
        self,
        labels: Any,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Labels -> generator label vector ``[N, input_dim]`` (docs/labels.md, 1479 by default).

        Columns: one-hot of each group in group order (all zeros where unknown), then one
        flag per group that is 1 where the group is known. ``device`` defaults to the label
        tensor's device (CPU for list input).
        """
        idx = self.encode_indices(labels)
        if device is not None:
            idx = idx.to(device)
        known = idx >= 0
        out = torch.zeros(idx.shape[0], self.input_dim, dtype=dtype, device=idx.device)
        offsets = torch.tensor(self._offsets, dtype=torch.long, device=idx.device)
        # Unknown groups scatter a 0 onto their first column, which is already 0.
        out.scatter_(1, offsets + idx.clamp(min=0), known.to(dtype))
        out[:, self.n_classes:] = known.to(dtype)
        return out

    def classifier_target(
        self,
        labels: Any,
        dtype: torch.dtype = torch.int8,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Labels -> classifier target ``[N, n_classes]`` in {-1, 0, 1} (docs/labels.md, 1476).

        One-hot of each known group; every entry of an unknown group is -1. ``dtype`` must be
        signed (int8 default; float dtypes allowed).
        """
        if dtype == torch.bool or dtype == torch.uint8 or (
            not dtype.is_floating_point and not dtype.is_signed
        ):
            raise TypeError(f"classifier_target: dtype must be signed (holds -1), got {dtype}")
        idx = self.encode_indices(labels)
        if device is not None:
            idx = idx.to(device)
        known = idx >= 0
        dev = idx.device
        group_of_col = torch.repeat_interleave(
            torch.arange(self.n_groups, device=dev),
            torch.tensor(self._sizes, device=dev),
        )
        unknown_cols = ~known[:, group_of_col]
        out = torch.zeros(idx.shape[0], self.n_classes, dtype=dtype, device=dev)
        out.masked_fill_(unknown_cols, -1)
        offsets = torch.tensor(self._offsets, dtype=torch.long, device=dev)
        # Unknown groups write -1 back onto their first column (already -1).
        src = torch.where(known, 1, -1).to(dtype)
        out.scatter_(1, offsets + idx.clamp(min=0), src)
        return out

    # ------------------------------------------------------------------ decoding
    def split(self, tensor: torch.Tensor, dim: int = -1) -> list[torch.Tensor]:
        """Per-group views of a ``[..., n_classes]`` tensor (targets, logits) along ``dim``.

        For a generator input, split ``vec[..., :space.n_classes]``; the flags are
        ``vec[..., space.n_classes:]``.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"split: expected a tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0 or tensor.shape[dim] != self.n_classes:
            shape = list(tensor.shape)
            hint = (
                " (a generator input: split vec[..., :n_classes])"
                if tensor.dim() and tensor.shape[dim] == self.input_dim
                else ""
            )
            raise ValueError(
                f"split: size of dim {dim} must be n_classes={self.n_classes}, "
                f"got shape {shape}{hint}"
            )
        return list(torch.split(tensor, self._sizes, dim=dim))

    def _check_width(self, what: str, t: torch.Tensor, width: int, name: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(
                f"{what}: expected shape [N, {width}] ({name} of {self!r}), got {list(t.shape)}"
            )

    def decode_target(self, target: torch.Tensor) -> torch.Tensor:
        """Classifier target ``[N, n_classes]`` -> indices ``[N, G]`` (-1 where all -1).

        ValueError if a group is neither all -1 nor a 0/1 one-hot.
        """
        self._check_width("decode_target", target, self.n_classes, "n_classes")
        return _onehot_segments_to_indices(
            self.split(target), self._names, "decode_target"
        ).to(target.device).reshape(target.shape[0], self.n_groups)

    def decode_prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``[N, n_classes]`` -> per-group argmax ``[N, G]`` (long)."""
        self._check_width("decode_prediction", logits, self.n_classes, "n_classes")
        cols = [seg.argmax(dim=1) for seg in self.split(logits.detach())]
        return torch.stack(cols, dim=1)

    def decode_generator_input(self, vec: torch.Tensor, strict: bool = True) -> torch.Tensor:
        """Generator label vector ``[N, input_dim]`` -> indices ``[N, G]`` (-1 where flag 0).

        With ``strict`` (default) flags must be 0/1, a flagged group a 0/1 one-hot and an
        unflagged group all zeros (else ValueError). ``strict=False`` reads soft vectors:
        known = flag > 0.5, class = argmax of the group.
        """
        self._check_width("decode_generator_input", vec, self.input_dim, "input_dim")
        vec = vec.detach()
        onehots, flags = vec[:, : self.n_classes], vec[:, self.n_classes:]
        if not strict:
            known = flags > 0.5
            idx = self.decode_prediction(onehots)
            return torch.where(known, idx, torch.full_like(idx, UNKNOWN))
        bad_flag = ~((flags == 0) | (flags == 1))
        if bool(bad_flag.any()):
            i, k = (int(v) for v in bad_flag.nonzero()[0])
            raise ValueError(
                f"decode_generator_input: flag of group '{self._names[k]}' in sample {i} is "
                f"{flags[i, k].item()!r}, expected 0 or 1"
            )
        known = flags == 1
        cols = []
        for k, seg in enumerate(self.split(onehots)):
            is_one = seg == 1
            is_zero = seg == 0
            n_one = is_one.sum(dim=1)
            ok = torch.where(
                known[:, k],
                (is_one | is_zero).all(dim=1) & (n_one == 1),
                is_zero.all(dim=1),
            )
            if not bool(ok.all()):
                i = int((~ok).nonzero()[0, 0])
                state = "known (flag 1) but not a 0/1 one-hot" if bool(known[i, k]) else (
                    "unknown (flag 0) but not all zeros"
                )
                raise ValueError(
                    f"decode_generator_input: group '{self._names[k]}' of sample {i} is {state} "
                    f"(values {_preview_values(seg[i])})"
                )
            idx = is_one.to(torch.uint8).argmax(dim=1).to(torch.long)
            cols.append(torch.where(known[:, k], idx, torch.full_like(idx, UNKNOWN)))
        return torch.stack(cols, dim=1)

    def to_dicts(self, indices: Any) -> list[dict[str, str | int | None]]:
        """Indices ``[N, G]`` -> list of ``{group: class name (or index) | None}`` (for display)."""
        idx = self.encode_indices(indices).tolist()
        out = []
        for row in idx:
            d: dict[str, str | int | None] = {}
            for k, v in enumerate(row):
                cn = self._class_names[k]
                d[self._names[k]] = None if v < 0 else (cn[v] if cn is not None else v)
            out.append(d)
        return out

    # ------------------------------------------------------------------ target sampling
    def sample_targets(
        self,
        indices: Any,
        generator: torch.Generator | None = None,
        strategy: str = "shuffle",
        return_perm: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw conversion targets c' for a batch (docs/labels.md#conversion-targets). Deterministic
        given ``generator``.

        ``strategy="shuffle"`` (default, StarGAN): sample i takes the whole label set of
        sample ``perm[i]``, where ``perm`` is a uniformly random derangement (``perm[i] != i``)
        when N > 1; unknown groups stay unknown. Two samples with equal labels can still give a
        sample its own labels. With N == 1 there is no other sample: the labels are returned
        unchanged (``perm = [0]``). ``return_perm=True`` also returns ``perm`` so the trainer
        can take ``x_orig = x[perm]`` (the real sample whose labels are the target).

        ``strategy="uniform"``: every group's class drawn uniformly from ``[0, size)``; all
        groups known. ``perm`` is then ``None``.

        Random numbers come from ``generator`` on its own device (CPU when None) and the
        result is moved to the labels' device.
        """
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"sample_targets: strategy must be one of {_STRATEGIES}, got {strategy!r}"
            )
        idx = self.encode_indices(indices)
        n = idx.shape[0]
        if strategy == "shuffle":
            perm = derangement(n, generator=generator, device=idx.device)
            targets = idx[perm]
            return (targets, perm) if return_perm else targets
        gen_device = generator.device if generator is not None else torch.device("cpu")
        cols = [
            torch.randint(0, s, (n,), generator=generator, device=gen_device) for s in self._sizes
        ]
        targets = torch.stack(cols, dim=1).to(device=idx.device, dtype=torch.long)
        if n == 0:
            targets = targets.reshape(0, self.n_groups)
        return (targets, None) if return_perm else targets


def _is_array(x: Any) -> bool:
    """numpy arrays (without importing numpy here)."""
    return type(x).__module__ == "numpy" and hasattr(x, "dtype") and hasattr(x, "shape")
