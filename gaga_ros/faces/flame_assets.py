"""Reading FLAME model files (FLAME 2020/2023 .pkl, GAGAvatar's FLAME_with_eye.pt) into plain arrays.

FLAME is licensed (https://flame.is.tue.mpg.de), so the project never ships it: users fetch it with
`gaga-ros fetch-assets`. The official .pkl files were pickled with `chumpy` arrays and scipy sparse
matrices; they are read here with a restricted unpickler that maps those classes to small stand-ins,
so neither chumpy (unmaintained, breaks on numpy >= 1.24) nor arbitrary pickle code is ever run.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gaga_ros.assets import FETCH_COMMAND, FLAME_LICENSE_URL, flame_dir
from gaga_ros.errors import InputError

#: Joints of FLAME with eyes: global (root), neck, jaw, left eye, right eye.
FLAME_JOINTS = 5
#: Shape coefficients FLAME stores before the expression block in `shapedirs`.
FLAME_SHAPE_BASIS = 300


class FlameAssetError(InputError):
    """A FLAME file that is missing or malformed; the message says what is expected and how to get it."""


@dataclass
class LandmarkEmbedding:
    """Landmarks as (face index, barycentric coordinates) pairs on the FLAME mesh.

    static: the 51 inner-face iBUG landmarks (17..67); dynamic: 79 yaw bins x 17 contour landmarks;
    full: 70 (68 iBUG plus the two eyes, GAGAvatar's "with_eye") or 68 landmarks.
    """

    static_faces: np.ndarray
    static_bary: np.ndarray
    dynamic_faces: np.ndarray
    dynamic_bary: np.ndarray
    full_faces: np.ndarray
    full_bary: np.ndarray


@dataclass
class FlameAssets:
    """One FLAME model as float32/int64 arrays, validated for consistent shapes."""

    faces: np.ndarray          # (F, 3) int64
    v_template: np.ndarray     # (V, 3)
    shapedirs: np.ndarray      # (V, 3, K): shape basis [0:300], expression basis [300:K]
    posedirs: np.ndarray       # (V, 3, 9 * (J - 1))
    j_regressor: np.ndarray    # (J, V) dense
    parents: np.ndarray        # (J,) int64, parents[0] = -1
    lbs_weights: np.ndarray    # (V, J)
    landmarks: LandmarkEmbedding | None = None
    source: str = "<memory>"

    @property
    def n_expression_basis(self) -> int:
        """Expression coefficients the file provides (after the 300 shape coefficients)."""
        return self.shapedirs.shape[2] - FLAME_SHAPE_BASIS


# --- errors -------------------------------------------------------------------------------------------

_EXPECTED_PT = (
    "expected a torch file holding {'flame_model': {f (9976,3), v_template (5023,3), "
    "shapedirs (5023,3,>=400), "
    "posedirs (5023,3,36), J_regressor (5,5023), kintree_table (2,5), weights (5023,5)}, 'lmk_embeddings': "
    "{static_lmk_faces_idx (51), static_lmk_bary_coords (51,3), dynamic_lmk_faces_idx (79,17), "
    "dynamic_lmk_bary_coords (79,17,3), full_lmk_faces_idx_with_eye (70), "
    "full_lmk_bary_coords_with_eye (70,3)}}"
)
_EXPECTED_PKL = (
    "expected a FLAME 2020/2023 pickle holding f, v_template, shapedirs, posedirs, J_regressor, "
    "kintree_table and weights"
)


def _error(path: Path | str, problem: str, expected: str) -> FlameAssetError:
    return FlameAssetError(
        f"{path}: {problem}; {expected}. Put GAGAvatar's FLAME_with_eye.pt (or FLAME 2020/2023's "
        f"generic_model.pkl / flame2023.pkl) in {flame_dir()}/; get it with `{FETCH_COMMAND}` after "
        f"accepting the FLAME licence at {FLAME_LICENSE_URL}")


# --- the restricted unpickler -------------------------------------------------------------------------

class _ChumpyStandIn:
    """Stands in for `chumpy.ch.Ch`: keeps the pickled state, whose 'x' is the stored array."""

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def array(self) -> np.ndarray:
        if not isinstance(getattr(self, "state", None), dict) or "x" not in self.state:
            raise TypeError("a chumpy object without a stored array 'x' (a derived chumpy expression)")
        return np.asarray(self.state["x"])


class _SparseStandIn:
    """Stands in for scipy.sparse csc/csr/coo matrices: rebuilds the dense array from the state."""

    kind = ""

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def array(self) -> np.ndarray:
        s = self.state
        shape = tuple(int(n) for n in s.get("_shape", s.get("shape", ())))
        dense = np.zeros(shape, np.float64)
        if self.kind == "coo":
            np.add.at(dense, (np.asarray(s["row"]), np.asarray(s["col"])), np.asarray(s["data"]))
            return dense
        indptr, indices, data = (np.asarray(s[k]) for k in ("indptr", "indices", "data"))
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if self.kind == "csc":
            np.add.at(dense, (indices, major), data)
        else:
            np.add.at(dense, (major, indices), data)
        return dense


def _sparse_class(kind: str) -> type:
    return type(f"_{kind}StandIn", (_SparseStandIn,), {"kind": kind})


_SPARSE = {f"{k}_matrix": _sparse_class(k) for k in ("csc", "csr", "coo")}


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs
    import copyreg

    from numpy.core import multiarray

    allowed: dict[tuple[str, str], object] = {}
    for mod in ("copy_reg", "copyreg"):
        allowed[(mod, "_reconstructor")] = copyreg._reconstructor  # type: ignore[attr-defined]  # private
    for mod in ("__builtin__", "builtins"):
        for name, obj in (("object", object), ("set", set), ("frozenset", frozenset), ("complex", complex)):
            allowed[(mod, name)] = obj
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct  # type: ignore[attr-defined]  # private
        allowed[(mod, "scalar")] = multiarray.scalar  # type: ignore[attr-defined]  # private
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = lambda buf, dtype, shape, order: np.frombuffer(
            buf, dtype=dtype).reshape(shape, order=order)
    allowed[("_codecs", "encode")] = codecs.encode  # bytes, as Python 3 writes them at protocol 2
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy arrays, plain containers and chumpy/scipy-sparse stand-ins come out of a FLAME pickle."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        if module.startswith("scipy.sparse") and name in _SPARSE:
            return _SPARSE[name]
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return np.dtype
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected class {module}.{name} in the pickle") from None


def _plain(value: object) -> object:
    if isinstance(value, (_ChumpyStandIn, _SparseStandIn)):
        return value.array()
    return value


def _unpickle(path: Path, stream) -> object:
    try:
        return _RestrictedUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
            KeyError, IndexError) as exc:
        raise _error(path, f"cannot be read as a FLAME pickle ({exc})", _EXPECTED_PKL) from None


# --- loading ------------------------------------------------------------------------------------------

def load_flame_assets(path: str | Path, landmarks_path: str | Path | None = None) -> FlameAssets:
    """Read a FLAME model: GAGAvatar's FLAME_with_eye.pt or a FLAME 2020/2023 .pkl.

    A .pkl carries no landmarks; pass `landmarks_path` (DECA's landmark_embedding.npy or an .npz with
    the same keys) to add them. For a .pt, `landmarks_path` replaces the embedded landmarks.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "file not found", _EXPECTED_PT)
    if path.suffix == ".pkl":
        assets = _from_pkl(path)
    elif path.suffix in (".pt", ".pth"):
        assets = _from_pt(path)
    else:
        raise _error(path, f"unknown extension {path.suffix!r} (accepted: .pt, .pkl)", _EXPECTED_PT)
    if landmarks_path is not None:
        assets.landmarks = load_landmark_embedding(landmarks_path, n_faces=assets.faces.shape[0])
    return assets


def _from_pt(path: Path) -> FlameAssets:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        problem = f"cannot be read by torch.load ({type(exc).__name__}: {exc})"
        raise _error(path, problem, _EXPECTED_PT) from None
    if not isinstance(data, dict) or not isinstance(data.get("flame_model"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise _error(path, f"no 'flame_model' dict (found {found})", _EXPECTED_PT)
    model = {k: _numpy(v) for k, v in data["flame_model"].items()}
    assets = _assemble(path, model, _EXPECTED_PT)
    lmk = data.get("lmk_embeddings")
    if isinstance(lmk, dict):
        lmk = {k: _numpy(v) for k, v in lmk.items()}
        assets.landmarks = _landmarks_from(path, lmk, assets.faces.shape[0])
    return assets


def _from_pkl(path: Path) -> FlameAssets:
    with path.open("rb") as stream:
        data = _unpickle(path, stream)
    if not isinstance(data, dict):
        raise _error(path, f"holds a {type(data).__name__}, not a dict", _EXPECTED_PKL)
    try:
        model = {k: _plain(v) for k, v in data.items()}
    except (TypeError, KeyError) as exc:
        raise _error(path, f"holds an unreadable array ({exc})", _EXPECTED_PKL) from None
    return _assemble(path, model, _EXPECTED_PKL)


def _numpy(value: object) -> object:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _assemble(path: Path, model: dict, expected: str) -> FlameAssets:
    required = ("f", "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
    missing = [k for k in required if k not in model]
    if missing:
        raise _error(path, f"missing keys {missing} (found {sorted(model)})", expected)
    arrays = {}
    for key in required:
        try:
            arrays[key] = np.asarray(model[key])
        except Exception as exc:
            raise _error(path, f"'{key}' is not an array ({exc})", expected) from None
        if arrays[key].dtype == object or not np.issubdtype(arrays[key].dtype, np.number):
            raise _error(path, f"'{key}' is not numeric (dtype {arrays[key].dtype})", expected)
    parents = arrays["kintree_table"].astype(np.int64).reshape(2, -1)[0].copy() \
        if arrays["kintree_table"].size % 2 == 0 else np.zeros(0, np.int64)
    if parents.size:
        parents[0] = -1
    assets = FlameAssets(
        faces=arrays["f"].astype(np.int64),
        v_template=arrays["v_template"].astype(np.float32),
        shapedirs=arrays["shapedirs"].astype(np.float32),
        posedirs=arrays["posedirs"].astype(np.float32),
        j_regressor=arrays["J_regressor"].astype(np.float32),
        parents=parents,
        lbs_weights=arrays["weights"].astype(np.float32),
        source=str(path),
    )
    problem = _shape_problem(assets)
    if problem:
        raise _error(path, problem, expected)
    return assets


def _shape_problem(a: FlameAssets) -> str | None:
    """The first inconsistency among the arrays, or None."""
    if a.v_template.ndim != 2 or a.v_template.shape[1] != 3:
        return f"v_template has shape {a.v_template.shape}, not (V,3)"
    v = a.v_template.shape[0]
    j = FLAME_JOINTS
    checks = (
        ("f", a.faces, a.faces.ndim == 2 and a.faces.shape[1] == 3, "(F,3)"),
        ("shapedirs", a.shapedirs, a.shapedirs.ndim == 3 and a.shapedirs.shape[:2] == (v, 3)
         and a.shapedirs.shape[2] >= FLAME_SHAPE_BASIS, f"({v},3,>=300)"),
        ("posedirs", a.posedirs, a.posedirs.shape == (v, 3, 9 * (j - 1)), f"({v},3,{9 * (j - 1)})"),
        ("J_regressor", a.j_regressor, a.j_regressor.shape == (j, v), f"({j},{v})"),
        ("kintree_table", a.parents, a.parents.shape == (j,), f"(2,{j})"),
        ("weights", a.lbs_weights, a.lbs_weights.shape == (v, j), f"({v},{j})"),
    )
    for name, arr, ok, want in checks:
        if not ok:
            return f"'{name}' has shape {arr.shape}, expected {want}"
    if a.faces.size and (a.faces.min() < 0 or a.faces.max() >= v):
        return f"'f' indexes vertices outside 0..{v - 1}"
    if any(not (-1 <= p < i) for i, p in enumerate(a.parents.tolist()[1:], start=1)):
        return f"kintree_table parents {a.parents.tolist()} are not a tree in joint order"
    for name, arr in (("v_template", a.v_template), ("shapedirs", a.shapedirs), ("posedirs", a.posedirs),
                      ("J_regressor", a.j_regressor), ("weights", a.lbs_weights)):
        if not np.all(np.isfinite(arr)):
            return f"'{name}' contains NaN or infinite values"
    return None


# --- landmarks ----------------------------------------------------------------------------------------

_LMK_KEYS = {
    "static_faces": ("static_lmk_faces_idx",),
    "static_bary": ("static_lmk_bary_coords",),
    "dynamic_faces": ("dynamic_lmk_faces_idx",),
    "dynamic_bary": ("dynamic_lmk_bary_coords",),
    "full_faces": ("full_lmk_faces_idx_with_eye", "full_lmk_faces_idx"),
    "full_bary": ("full_lmk_bary_coords_with_eye", "full_lmk_bary_coords"),
}
_EXPECTED_LMK = (
    "expected landmark embeddings static_lmk_faces_idx (51), static_lmk_bary_coords (51,3), "
    "dynamic_lmk_faces_idx (79,17), dynamic_lmk_bary_coords (79,17,3) and full_lmk_faces_idx[_with_eye] "
    "(70 or 68) with full_lmk_bary_coords[_with_eye]"
)


def load_landmark_embedding(path: str | Path, n_faces: int) -> LandmarkEmbedding:
    """Read DECA-style landmark embeddings (.npy holding a dict, or .npz) for a FLAME .pkl."""
    path = Path(path)
    if not path.is_file():
        raise _error(path, "landmark file not found", _EXPECTED_LMK)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    elif path.suffix == ".npy":
        data = _npy_dict(path)
    else:
        raise _error(path, f"unknown extension {path.suffix!r} (accepted: .npy, .npz)", _EXPECTED_LMK)
    return _landmarks_from(path, data, n_faces)


def _npy_dict(path: Path) -> dict:
    """A .npy holding a pickled dict, read through the restricted unpickler instead of np.load's."""
    with path.open("rb") as stream:
        try:
            version = np.lib.format.read_magic(stream)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(stream)
        except ValueError as exc:
            raise _error(path, f"not a .npy file ({exc})", _EXPECTED_LMK) from None
        if header[2] != np.dtype(object):
            raise _error(path, f"holds a plain {header[2]} array, not a dict", _EXPECTED_LMK)
        data = _unpickle(path, stream)
    if isinstance(data, np.ndarray) and data.dtype == object and data.size == 1:
        data = data.item()
    if not isinstance(data, dict):
        raise _error(path, f"holds a {type(data).__name__}, not a dict", _EXPECTED_LMK)
    return data


def _landmarks_from(path: Path, data: dict, n_faces: int) -> LandmarkEmbedding:
    values = {}
    for field_name, keys in _LMK_KEYS.items():
        key = next((k for k in keys if k in data), None)
        if key is None:
            raise _error(path, f"missing landmark key {keys[0]} (found {sorted(data)})", _EXPECTED_LMK)
        values[field_name] = np.asarray(_numpy(data[key]))
    lmk = LandmarkEmbedding(
        static_faces=values["static_faces"].astype(np.int64).reshape(-1),
        static_bary=values["static_bary"].astype(np.float32).reshape(-1, 3),
        dynamic_faces=values["dynamic_faces"].astype(np.int64),
        dynamic_bary=values["dynamic_bary"].astype(np.float32),
        full_faces=values["full_faces"].astype(np.int64).reshape(-1),
        full_bary=values["full_bary"].astype(np.float32).reshape(-1, 3),
    )
    n_dyn = lmk.dynamic_faces.shape
    if lmk.static_faces.shape[0] != lmk.static_bary.shape[0]:
        raise _error(path, "static faces and barycentric coordinates differ in count", _EXPECTED_LMK)
    if lmk.dynamic_faces.ndim != 2 or lmk.dynamic_bary.shape != (*n_dyn, 3):
        problem = f"dynamic embedding shapes {n_dyn} and {lmk.dynamic_bary.shape} disagree"
        raise _error(path, problem, _EXPECTED_LMK)
    if lmk.full_faces.shape[0] != lmk.full_bary.shape[0]:
        raise _error(path, "full faces and barycentric coordinates differ in count", _EXPECTED_LMK)
    for f in fields(lmk):
        arr = getattr(lmk, f.name)
        if f.name.endswith("faces") and arr.size and (arr.min() < 0 or arr.max() >= n_faces):
            raise _error(path, f"{f.name} indexes faces outside 0..{n_faces - 1}", _EXPECTED_LMK)
    return lmk


def save_flame_with_eye(assets: FlameAssets, path: str | Path) -> Path:
    """Write assets in GAGAvatar's FLAME_with_eye.pt layout (e.g. to convert a .pkl plus landmarks)."""
    if assets.landmarks is None:
        raise FlameAssetError("FLAME_with_eye.pt needs landmark embeddings: load them with landmarks_path")
    path = Path(path)
    kintree = np.stack([assets.parents, np.arange(FLAME_JOINTS)]).astype(np.int64)
    lmk = assets.landmarks
    t = torch.from_numpy
    data = {
        "flame_model": {
            "f": t(assets.faces), "v_template": t(assets.v_template), "shapedirs": t(assets.shapedirs),
            "posedirs": t(assets.posedirs), "J_regressor": t(assets.j_regressor), "kintree_table": t(kintree),
            "weights": t(assets.lbs_weights),
        },
        "lmk_embeddings": {
            "static_lmk_faces_idx": t(lmk.static_faces), "static_lmk_bary_coords": t(lmk.static_bary),
            "dynamic_lmk_faces_idx": t(lmk.dynamic_faces), "dynamic_lmk_bary_coords": t(lmk.dynamic_bary),
            "full_lmk_faces_idx_with_eye": t(lmk.full_faces)[None],
            "full_lmk_bary_coords_with_eye": t(lmk.full_bary)[None],
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path
