"""FLAME layer, FLAME file loading and the synthetic FLAME-format model (no licensed file needed)."""

import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gaga_ros.assets import FETCH_COMMAND, LicenceNotAccepted, fetch_assets, find_assets
from gaga_ros.conventions import FLAME_SCALE, FLAME_VERTICES
from gaga_ros.faces.flame import Flame, FlameInputError
from gaga_ros.faces.flame_assets import FlameAssetError, load_flame_assets
from gaga_ros.faces.synthetic_flame import (
    LEFT_EYE,
    RIGHT_EYE,
    make_synthetic_flame,
    write_synthetic_flame,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=3)


@pytest.fixture(scope="module")
def assets(files):
    return load_flame_assets(files.pt)


@pytest.fixture(scope="module")
def flame(assets):
    return Flame(assets)


def _random_params(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rand(width, scale=1.0):
        return scale * torch.randn(batch, width, generator=g)

    return dict(shape=rand(300), expression=rand(100), global_pose=rand(3, 0.3), neck_pose=rand(3, 0.2),
                jaw_pose=rand(3, 0.2), eye_pose=rand(6, 0.3))


def test_synthetic_model_has_flame_structure_and_is_deterministic():
    a = make_synthetic_flame(seed=1)
    assert a.v_template.shape == (FLAME_VERTICES, 3) and a.faces.shape == (9976, 3)
    assert a.shapedirs.shape == (5023, 3, 400) and a.posedirs.shape == (5023, 3, 36)
    assert a.j_regressor.shape == (5, 5023) and a.lbs_weights.shape == (5023, 5)
    assert a.parents.tolist() == [-1, 0, 1, 1, 1]
    lmk = a.landmarks
    assert lmk.static_faces.shape == (51,) and lmk.dynamic_faces.shape == (79, 17)
    assert lmk.dynamic_bary.shape == (79, 17, 3) and lmk.full_faces.shape == (70,)
    np.testing.assert_allclose(a.lbs_weights.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(a.j_regressor.sum(1), 1, atol=1e-6)
    assert len(np.unique(a.faces)) == FLAME_VERTICES  # every vertex belongs to a triangle
    # Each eyeball is weighted only to its eye joint, and the jaw/neck regions exist and differ.
    assert (a.lbs_weights[list(LEFT_EYE), 3] == 1).all() and (a.lbs_weights[list(RIGHT_EYE), 4] == 1).all()
    assert (a.lbs_weights[:, 2] > 0.5).sum() > 100 and (a.lbs_weights[:, 0] > 0.5).sum() > 100
    b = make_synthetic_flame(seed=1)
    for name in ("v_template", "shapedirs", "posedirs", "j_regressor", "lbs_weights"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(make_synthetic_flame(seed=2).shapedirs, a.shapedirs)


def test_zero_parameters_give_the_template_times_scale(flame, assets):
    verts = flame(batch_size=2)
    assert verts.shape == (2, FLAME_VERTICES, 3) and verts.dtype == torch.float32
    expected = FLAME_SCALE * torch.from_numpy(assets.v_template)
    torch.testing.assert_close(verts, expected.expand(2, -1, -1), atol=1e-6, rtol=0)


def test_global_rotation_is_a_rigid_rotation_about_the_root(flame, assets):
    rotvec = np.array([0.2, -0.5, 0.1])
    verts = flame(global_pose=torch.tensor(rotvec[None], dtype=torch.float32))[0].double().numpy()
    root = assets.j_regressor[0].astype(np.float64) @ assets.v_template
    expected = Rotation.from_rotvec(rotvec).apply(assets.v_template - root) + root
    np.testing.assert_allclose(verts, FLAME_SCALE * expected, atol=2e-5)


def _corrective(assets, joint, rotvec):
    """Pose-corrective offsets of one joint, computed independently of the layer."""
    feature = (Rotation.from_rotvec(rotvec).as_matrix() - np.eye(3)).reshape(9)
    return assets.posedirs[:, :, 9 * (joint - 1):9 * joint].astype(np.float64) @ feature


def test_jaw_rotation_moves_only_jaw_weighted_vertices(flame, assets):
    rotvec = np.array([0.35, 0.0, 0.05])
    verts = flame(jaw_pose=torch.tensor(rotvec[None], dtype=torch.float32))[0].double().numpy() / FLAME_SCALE
    moved = np.linalg.norm(verts - assets.v_template, axis=1)
    jaw_w = assets.lbs_weights[:, 2]
    assert moved[jaw_w == 0].max() < 1e-6
    assert moved[jaw_w > 0.5].min() > 1e-4
    # Fully jaw-weighted vertices rotate about the jaw joint, after their pose correctives.
    full = jaw_w == 1
    jaw = assets.j_regressor[2].astype(np.float64) @ assets.v_template
    rest = assets.v_template + _corrective(assets, 2, rotvec)
    expected = Rotation.from_rotvec(rotvec).apply(rest[full] - jaw) + jaw
    np.testing.assert_allclose(verts[full], expected, atol=2e-6)


def test_jaw_follows_the_neck_through_the_kinematic_chain(flame, assets):
    neck, jaw_rot = np.array([0.1, 0.3, -0.2]), np.array([0.3, 0.0, 0.0])
    verts = flame(neck_pose=torch.tensor(neck[None], dtype=torch.float32),
                  jaw_pose=torch.tensor(jaw_rot[None], dtype=torch.float32))[0].double().numpy() / FLAME_SCALE
    full = assets.lbs_weights[:, 2] == 1
    j_neck, j_jaw = (assets.j_regressor[k].astype(np.float64) @ assets.v_template for k in (1, 2))
    rest = assets.v_template + _corrective(assets, 1, neck) + _corrective(assets, 2, jaw_rot)
    in_neck = Rotation.from_rotvec(jaw_rot).apply(rest[full] - j_jaw) + j_jaw
    expected = Rotation.from_rotvec(neck).apply(in_neck - j_neck) + j_neck
    np.testing.assert_allclose(verts[full], expected, atol=2e-6)


def test_eye_poses_move_only_their_eyeball(flame, assets):
    rotvec = np.array([0.0, 0.4, 0.0])
    eye_pose = torch.tensor(np.r_[rotvec, 0, 0, 0][None], dtype=torch.float32)
    verts = flame(eye_pose=eye_pose)[0].double().numpy() / FLAME_SCALE
    moved = np.linalg.norm(verts - assets.v_template, axis=1) > 1e-6
    left = np.zeros(FLAME_VERTICES, bool)
    left[list(LEFT_EYE)] = True
    assert (moved == left).all()
    centre = assets.j_regressor[3].astype(np.float64) @ assets.v_template
    rest = assets.v_template[left] + _corrective(assets, 3, rotvec)[left]
    expected = Rotation.from_rotvec(rotvec).apply(rest - centre) + centre
    np.testing.assert_allclose(verts[left], expected, atol=2e-6)
    both = flame(eye_pose=torch.tensor([[0.1, 0.2, 0, -0.1, 0.2, 0]]))[0].numpy() / FLAME_SCALE
    moved = np.linalg.norm(both - assets.v_template, axis=1) > 1e-6
    assert moved[list(LEFT_EYE)].all() and moved[list(RIGHT_EYE)].all() and moved.sum() == 2 * len(LEFT_EYE)


def test_batched_equals_per_item(flame):
    params = _random_params(3)
    batched = flame(**params)
    for i in range(3):
        single = flame(**{k: v[i:i + 1] for k, v in params.items()})
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_gagavatar_codes_assemble_global_and_jaw(flame):
    p = _random_params(2, seed=1)
    posecode = torch.cat([p["global_pose"], p["jaw_pose"]], 1)
    via_codes = flame.forward_codes(p["shape"], p["expression"], posecode, p["eye_pose"])
    direct = flame(shape=p["shape"], expression=p["expression"], global_pose=p["global_pose"],
                   jaw_pose=p["jaw_pose"], eye_pose=p["eye_pose"])
    torch.testing.assert_close(via_codes, direct)
    short = flame(expression=p["expression"][:, :50])  # missing trailing coefficients count as zero
    padded = flame(expression=torch.cat([p["expression"][:, :50], torch.zeros(2, 50)], 1))
    torch.testing.assert_close(short, padded)


def test_shape_and_expression_are_differentiable(flame):
    expr = torch.zeros(1, 100, requires_grad=True)
    jaw = torch.zeros(1, 3, requires_grad=True)
    verts = flame(expression=expr, jaw_pose=jaw)
    flame.landmarks(verts).sum().backward()
    assert expr.grad.abs().sum() > 0 and jaw.grad.abs().sum() > 0


def _distance_to_mesh(points, verts, faces):
    """Distance from each point to the nearest triangle, by projecting onto every triangle's plane."""
    a, b, c = (verts[faces[:, k]] for k in range(3))
    n = torch.linalg.cross(b - a, c - a)
    n = n / n.norm(dim=1, keepdim=True)
    d = points[:, None] - a[None]                                    # (P, F, 3)
    height = (d * n).sum(-1)
    foot = points[:, None] - height[..., None] * n

    def inside(p, q, r):
        return (torch.linalg.cross((q - p)[None].expand_as(foot), foot - p[None]) * n).sum(-1) >= -1e-12

    ok = inside(a, b, c) & inside(b, c, a) & inside(c, a, b)
    return torch.where(ok, height.abs(), torch.inf).min(1).values


def test_landmarks_lie_on_the_posed_mesh(flame):
    params = _random_params(1, seed=4)
    verts = flame(**params).double()
    faces = flame.faces
    for kind in ("full", "static", "ibug68"):
        lmk = flame.landmarks(verts, kind, global_pose=params["global_pose"], neck_pose=params["neck_pose"])
        assert lmk.shape == (1, {"full": 70, "static": 51, "ibug68": 68}[kind], 3)
        assert _distance_to_mesh(lmk[0], verts[0], faces).max() < 1e-6  # float32 barycentrics
    # The two extra "with eye" landmarks are the pupils: the eyeballs' front poles.
    full = flame.landmarks(verts)
    torch.testing.assert_close(full[0, 68:], verts[0, [RIGHT_EYE.start, LEFT_EYE.start]])


def test_ibug68_contour_follows_head_yaw(flame):
    verts = flame(batch_size=1)

    def contour(yaw_deg):
        pose = torch.tensor([[0.0, np.deg2rad(yaw_deg), 0.0]])
        return flame.landmarks(verts, "ibug68", global_pose=pose)[0, :17]
    assert flame.contour_bins(torch.tensor([[0, np.deg2rad(30), 0.0]]), torch.zeros(1, 3)).item() == 30
    assert flame.contour_bins(torch.tensor([[0, np.deg2rad(-30), 0.0]]), torch.zeros(1, 3)).item() == 69
    assert flame.contour_bins(torch.tensor([[0, np.deg2rad(-60), 0.0]]), torch.zeros(1, 3)).item() == 78
    assert not torch.allclose(contour(0), contour(25)) and not torch.allclose(contour(25), contour(-25))


def test_pkl_loads_the_same_model_as_pt(files, flame):
    from_pkl = Flame.from_file(files.pkl, landmarks_path=files.landmarks)
    params = _random_params(2, seed=5)
    v_pt, v_pkl = flame(**params), from_pkl(**params)
    torch.testing.assert_close(v_pkl, v_pt, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_pkl.landmarks(v_pkl, "full"), flame.landmarks(v_pt, "full")[:, :68])
    poses = params["global_pose"], params["neck_pose"]
    torch.testing.assert_close(from_pkl.landmarks(v_pkl, "ibug68", *poses),
                               flame.landmarks(v_pt, "ibug68", *poses))
    without = Flame.from_file(files.pkl)
    with pytest.raises(FlameInputError, match="landmark"):
        without.landmarks(v_pkl)


def test_published_pt_layout_loads(tmp_path, assets):
    """The key layout of docs/flame.md, with the singleton landmark dims and integer types varied."""
    t = torch.from_numpy
    kintree = torch.tensor([[4294967295 % 2**31, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=torch.int64)
    extra = np.concatenate([assets.shapedirs, assets.shapedirs[:, :, :20]], 2)  # >= 400 bases
    lmk = assets.landmarks
    data = {
        "flame_model": {"f": t(assets.faces.astype(np.int32)), "v_template": t(assets.v_template),
                        "shapedirs": t(extra), "posedirs": t(assets.posedirs),
                        "J_regressor": t(assets.j_regressor),
                        "kintree_table": kintree, "weights": t(assets.lbs_weights)},
        "lmk_embeddings": {"static_lmk_faces_idx": t(lmk.static_faces.astype(np.int32)),
                           "static_lmk_bary_coords": t(lmk.static_bary),
                           "dynamic_lmk_faces_idx": t(lmk.dynamic_faces),
                           "dynamic_lmk_bary_coords": t(lmk.dynamic_bary),
                           "full_lmk_faces_idx_with_eye": t(lmk.full_faces),
                           "full_lmk_bary_coords_with_eye": t(lmk.full_bary)},
    }
    torch.save(data, tmp_path / "FLAME_with_eye.pt")
    model = Flame.from_file(tmp_path / "FLAME_with_eye.pt")
    assert model.n_exp == 100 and model.shapedirs.shape == (5023, 3, 400)
    assert model.parents.tolist() == [-1, 0, 1, 1, 1]
    verts = model(batch_size=1)
    assert model.landmarks(verts).shape == (1, 70, 3)


def test_fewer_expression_bases_in_the_file_cap_n_exp(assets):
    from dataclasses import replace
    small = replace(assets, shapedirs=assets.shapedirs[:, :, :350])
    model = Flame(small, n_exp=100)
    assert model.n_exp == 50
    with pytest.raises(FlameInputError, match=r"<= 50"):
        model(expression=torch.zeros(1, 100))


def _expect_clear(path, *fragments):
    with pytest.raises(FlameAssetError) as info:
        load_flame_assets(path)
    message = str(info.value)
    for fragment in (str(path), "models/flame", FETCH_COMMAND, "flame.is.tue.mpg.de", *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_bad_files_give_clear_errors(tmp_path, assets):
    _expect_clear(tmp_path / "FLAME_with_eye.pt", "file not found")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    _expect_clear(tmp_path / "junk.pt", "torch.load")
    torch.save({"model": {}}, tmp_path / "nokey.pt")
    _expect_clear(tmp_path / "nokey.pt", "'flame_model'", "v_template (5023,3)")
    torch.save({"flame_model": {"f": torch.zeros(3, 3)}}, tmp_path / "missing.pt")
    _expect_clear(tmp_path / "missing.pt", "missing keys", "shapedirs")
    t = torch.from_numpy
    bad = {"f": t(assets.faces), "v_template": t(assets.v_template),
           "shapedirs": t(assets.shapedirs[:, :, :10]),
           "posedirs": t(assets.posedirs), "J_regressor": t(assets.j_regressor),
           "kintree_table": torch.tensor([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
           "weights": t(assets.lbs_weights)}
    torch.save({"flame_model": bad}, tmp_path / "shapes.pt")
    _expect_clear(tmp_path / "shapes.pt", "'shapedirs' has shape (5023, 3, 10)", "(5023,3,>=300)")
    (tmp_path / "model.obj").write_text("v 0 0 0\n")
    _expect_clear(tmp_path / "model.obj", "unknown extension")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"f": np.zeros((3, 3))}, protocol=2)[:40])
    _expect_clear(tmp_path / "cut.pkl", "cannot be read as a FLAME pickle")


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pkl_loader_runs_no_foreign_code(tmp_path, capsys):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"f": _Exploit()}, protocol=2))
    _expect_clear(tmp_path / "evil.pkl", "unexpected class", ".print")
    assert "pickle code ran" not in capsys.readouterr().out


def test_bad_parameters_give_clear_errors(flame):
    with pytest.raises(FlameInputError, match=r"jaw_pose has shape \(2, 4\).*\(B, 3\)"):
        flame(jaw_pose=torch.zeros(2, 4))
    with pytest.raises(FlameInputError, match="batch size"):
        flame(shape=torch.zeros(2, 300), expression=torch.zeros(3, 100))
    with pytest.raises(FlameInputError, match="accepted"):
        flame(shape=torch.zeros(300))
    with pytest.raises(FlameInputError, match="'full', 'static', 'ibug68'"):
        flame.landmarks(flame(batch_size=1), "dense")


def test_find_assets_reports_what_is_missing_and_what_works(tmp_path, files):
    status = find_assets(tmp_path)
    assert status.gagavatar is None and status.flame is None and not status.complete
    text = status.explain()
    assert FETCH_COMMAND in text and "geometric" in text and "GAGAvatar.pt" in text
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame" / "generic_model.pkl").write_bytes(files.pkl.read_bytes())
    (tmp_path / "gagavatar").mkdir()
    (tmp_path / "gagavatar" / "GAGAvatar.pt").write_bytes(b"weights")
    status = find_assets(tmp_path)
    assert status.flame == tmp_path / "flame" / "generic_model.pkl" and status.complete
    assert "Everything is in place" in status.explain()


@pytest.mark.parametrize("answer", ["no", "y", "", EOFError])
def test_fetch_refuses_without_a_typed_yes(tmp_path, answer):
    shown = []

    def ask(prompt):
        shown.append(prompt)
        if answer is EOFError:
            raise EOFError
        return answer

    with pytest.raises(LicenceNotAccepted, match="nothing was downloaded"):
        fetch_assets(tmp_path / "models", ask=ask, out=shown.append)
    assert any("flame.is.tue.mpg.de" in s for s in shown) and any("non-commercial" in s for s in shown)
    assert not (tmp_path / "models").exists()


@pytest.mark.gpu
def test_gpu_matches_cpu(flame):
    params = _random_params(4, seed=7)
    cpu = flame(**params)
    gpu_flame = Flame(make_synthetic_flame(seed=3)).cuda()
    gpu = gpu_flame(**{k: v.cuda() for k, v in params.items()})
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    assert gpu_flame.landmarks(gpu, "ibug68", params["global_pose"].cuda()).device.type == "cuda"
