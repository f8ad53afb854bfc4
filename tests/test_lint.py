"""Lint and manifest checks: ruff over the code, mypy over gaga_ros/ (mypy.ini), package.xml against
REP 149 (format 3) rules.

The manifest checks need no network: the element order and required elements of the format 3
schema, and that every ROS package the code imports or the interfaces use is declared, so
`rosdep install` on a fresh workspace gets everything the nodes need.
"""

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ROS packages that the Python code may import; each needs a depend or exec_depend.
ROS_PACKAGES = {"rclpy", "sensor_msgs", "std_msgs", "std_srvs", "diagnostic_msgs", "rcl_interfaces",
                "lifecycle_msgs", "builtin_interfaces", "ament_index_python", "launch", "launch_ros",
                "geometry_msgs"}
#: REP 149: these come first, in this order (maintainer and license may repeat).
HEAD_ORDER = ["name", "version", "description", "maintainer", "license"]
#: Elements allowed after the head (the schema's choice group), then export last.
BODY = {"url", "author", "build_depend", "build_export_depend", "buildtool_depend",
        "buildtool_export_depend", "exec_depend", "depend", "doc_depend", "test_depend", "conflict",
        "replace", "group_depend", "member_of_group", "export"}


def test_ruff_reports_nothing():
    dirs = [d for d in ("gaga_ros", "tests", "bench", "launch") if (REPO / d).is_dir()]
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *dirs],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, f"ruff findings (ruff.toml rules):\n{res.stdout}{res.stderr}"


def test_mypy_reports_nothing():
    """The type checker over gaga_ros/ with mypy.ini (what it checks, and the few modules it leaves
    out for now, is said there)."""
    res = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"mypy findings (mypy.ini):\n{res.stdout[-6000:]}{res.stderr[-2000:]}"
    checked = re.search(r"no issues found in (\d+) source files", res.stdout)
    assert checked and int(checked.group(1)) >= 60, f"mypy checked too little: {res.stdout}"


@pytest.fixture(scope="module")
def manifest() -> ET.Element:
    return ET.parse(REPO / "package.xml").getroot()


def declared(root: ET.Element, *tags: str) -> set[str]:
    return {(e.text or "").strip() for tag in tags for e in root.findall(tag)}


def test_manifest_follows_format_3(manifest):
    assert manifest.tag == "package" and manifest.get("format") == "3"
    tags = [child.tag for child in manifest if isinstance(child.tag, str)]
    head = [t for t in tags if t in HEAD_ORDER]
    assert head == sorted(head, key=HEAD_ORDER.index), f"REP 149 order is {HEAD_ORDER}, got {head}"
    assert tags[: len(head)] == head, "name, version, description, maintainer, license come first"
    for tag in ("name", "version", "description", "maintainer", "license"):
        assert manifest.findall(tag), f"package.xml lacks <{tag}>"
    for tag in ("name", "version", "description"):
        assert len(manifest.findall(tag)) == 1, f"<{tag}> must appear once"
    assert set(tags[len(head):]) <= BODY, f"unknown elements: {set(tags[len(head):]) - BODY}"
    assert tags[-1] == "export" and tags.count("export") == 1
    name = manifest.findtext("name").strip()
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"package name {name!r} (REP 144: lower case, _)"
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest.findtext("version").strip())
    for m in manifest.findall("maintainer"):
        assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", m.get("email", "")), "maintainer needs an email"
        assert (m.text or "").strip()
    assert all((lic.text or "").strip() for lic in manifest.findall("license"))
    setup_version = re.search(r"version=['\"]([^'\"]+)", (REPO / "setup.py").read_text())
    if setup_version:
        assert setup_version.group(1) == manifest.findtext("version").strip(), "setup.py and package.xml"


def test_manifest_builds_its_interfaces(manifest):
    build_type = manifest.find("export/build_type")
    assert build_type is not None and build_type.text == "ament_cmake"
    assert (REPO / "CMakeLists.txt").is_file()
    assert "rosidl_default_generators" in declared(manifest, "buildtool_depend", "build_depend", "depend")
    assert "rosidl_default_runtime" in declared(manifest, "exec_depend", "depend")
    assert "rosidl_interface_packages" in declared(manifest, "member_of_group")
    # Types the .msg/.srv files use from other packages need build and exec dependencies.
    used = set()
    for f in [*REPO.glob("msg/*.msg"), *REPO.glob("srv/*.srv")]:
        used |= set(re.findall(r"^\s*([a-z][a-z0-9_]*)/[A-Z]\w*", f.read_text(), flags=re.MULTILINE))
    missing = used - declared(manifest, "depend") - {manifest.findtext("name").strip()}
    assert not missing, f"interfaces use {sorted(missing)}: add <depend> for them"


def imported_ros_packages() -> dict[str, set[str]]:
    """ROS package -> files under gaga_ros/ and launch/ that import it."""
    found: dict[str, set[str]] = {}
    for path in [*REPO.glob("gaga_ros/**/*.py"), *REPO.glob("launch/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ROS_PACKAGES:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_ros_package_is_declared(manifest):
    imports = imported_ros_packages()
    assert "rclpy" in imports  # the scan works: the nodes import rclpy
    have = declared(manifest, "depend", "exec_depend")
    missing = {pkg: sorted(files) for pkg, files in imports.items() if pkg not in have}
    assert not missing, "package.xml lacks <exec_depend> (or <depend>) for: " + "; ".join(
        f"{pkg} (imported in {', '.join(files)})" for pkg, files in sorted(missing.items()))


#: The adapters to ROS: the nodes and the process entry that runs them. Everything else is the core,
#: which tests and benchmarks call directly and which must load without ROS installed.
ADAPTERS = ("gaga_ros/nodes/", "gaga_ros/cli.py")
#: Adapter-side modules the core may read: the topic names are plain strings, and the graph
#: description (gaga_ros/graph.py) wires nodes by them.
PLAIN = ("gaga_ros.nodes", "gaga_ros.nodes.names")


def test_the_core_imports_no_ros_module():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in REPO.glob("gaga_ros/**/*.py")
        if not str(p.relative_to(REPO)).startswith(ADAPTERS) and p.name != "__main__.py")
    assert "gaga_ros.named" in modules and "gaga_ros.render.rasterize" in modules  # the scan works
    probe = ("import importlib, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             f"ros = {sorted(ROS_PACKAGES | {'gaga_ros.msg', 'gaga_ros.srv', 'gaga_ros.nodes'})!r}\n"
             "print(sorted(m for m in sys.modules if (m.split('.')[0] in ros or m in ros"
             f" or any(m.startswith(r + '.') for r in ros)) and m not in {PLAIN!r}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"the core loaded ROS modules: {out.stdout[-2000:]}"
