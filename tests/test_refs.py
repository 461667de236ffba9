"""Docker's reference grammar, as p2pull.core.refs parses it."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pull.core.refs import (DEFAULT_TAG, DOCKER_HUB, DOCKER_HUB_ENDPOINT, Ref, parse_ref,
                              validate_digest)
from p2pull.errors import RefError, UsageError

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


# -- valid references -------------------------------------------------------------------


def test_bare_name_is_docker_hub_library_latest():
    ref = parse_ref("ubuntu")
    assert ref == Ref("docker.io", "library/ubuntu", None, None)
    assert ref.tag is None
    assert ref.reference == "latest" == DEFAULT_TAG
    assert ref.endpoint == DOCKER_HUB_ENDPOINT
    assert str(ref) == "docker.io/library/ubuntu"


def test_bare_name_with_tag():
    ref = parse_ref("ubuntu:22.04")
    assert ref == Ref("docker.io", "library/ubuntu", "22.04", None)
    assert ref.reference == "22.04"


def test_user_repo_on_docker_hub_gets_no_library_prefix():
    ref = parse_ref("user/repo")
    assert ref == Ref("docker.io", "user/repo", None, None)


def test_explicit_docker_hub_single_component_gets_library():
    assert parse_ref("docker.io/ubuntu") == Ref("docker.io", "library/ubuntu")


def test_localhost_with_port_and_deep_path():
    ref = parse_ref("localhost:5000/a/b/c:tag")
    assert ref == Ref("localhost:5000", "a/b/c", "tag", None)
    assert ref.endpoint == "localhost:5000"
    assert ref.reference == "tag"


def test_bare_localhost_is_a_registry():
    assert parse_ref("localhost/repo") == Ref("localhost", "repo")


def test_ipv4_registry_with_port():
    ref = parse_ref("127.0.0.1:5000/x")
    assert ref == Ref("127.0.0.1:5000", "x", None, None)
    assert ref.reference == "latest"


def test_digest_reference():
    ref = parse_ref(f"registry.example.com/ns/repo@{DIGEST}")
    assert ref == Ref("registry.example.com", "ns/repo", None, DIGEST)
    assert ref.reference == DIGEST


def test_tag_and_digest_together_pins_the_digest():
    ref = parse_ref(f"registry.example.com/ns/repo:v1@{DIGEST}")
    assert ref.tag == "v1"
    assert ref.digest == DIGEST
    assert ref.reference == DIGEST
    assert str(ref) == f"registry.example.com/ns/repo:v1@{DIGEST}"


def test_ipv6_registry():
    ref = parse_ref("[::1]:5000/repo")
    assert ref == Ref("[::1]:5000", "repo", None, None)
    assert parse_ref("[::1]:5000/repo:v2").tag == "v2"
    assert parse_ref("[fe80::1]/a/b") == Ref("[fe80::1]", "a/b")


def test_registry_with_port_and_no_dot():
    assert parse_ref("registry:5000/repo") == Ref("registry:5000", "repo")


def test_first_component_without_dot_or_colon_is_a_path():
    assert parse_ref("registry/repo") == Ref("docker.io", "registry/repo")


def test_default_registry_from_argument_gets_no_library():
    ref = parse_ref("ubuntu", default_registry="registry.example.com")
    assert ref == Ref("registry.example.com", "ubuntu", None, None)
    assert ref.endpoint == "registry.example.com"
    # an explicit registry still wins over the default
    assert parse_ref("other.io/x", default_registry="registry.example.com").registry == "other.io"


def test_default_registry_docker_hub_as_argument():
    assert parse_ref("ubuntu", default_registry="docker.io").repository == "library/ubuntu"


def test_index_docker_io_is_normalised():
    ref = parse_ref("index.docker.io/ubuntu:20.04")
    assert ref == Ref(DOCKER_HUB, "library/ubuntu", "20.04", None)
    assert parse_ref("index.docker.io/user/repo") == Ref(DOCKER_HUB, "user/repo")


def test_path_component_separators():
    for name in ("a.b/c", "a_b", "a__b", "a-b", "a---b", "a0/b1/c2"):
        parse_ref(f"example.com/{name}")


def test_tag_grammar_limits():
    assert parse_ref("repo:_x").tag == "_x"
    assert parse_ref("repo:" + "a" * 128).tag == "a" * 128
    assert parse_ref("repo:V1.0-rc_1").tag == "V1.0-rc_1"


def test_with_digest():
    ref = parse_ref("example.com/a:v1").with_digest(DIGEST)
    assert ref == Ref("example.com", "a", "v1", DIGEST)


def test_ref_is_hashable_value():
    assert {parse_ref("ubuntu"), parse_ref("docker.io/library/ubuntu")} == {
        Ref("docker.io", "library/ubuntu")}


# -- malformed references -----------------------------------------------------------------


def bad(text: str, *parts: str, **kwargs) -> RefError:
    with pytest.raises(RefError) as info:
        parse_ref(text, **kwargs)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    return info.value


def test_ref_error_is_a_usage_error():
    assert issubclass(RefError, UsageError)
    assert bad("").exit_code == 2


def test_uppercase_repository():
    bad("Ubuntu", "'Ubuntu'", "repository")
    bad("example.com/ns/MyRepo:v1", "'MyRepo'")


@pytest.mark.parametrize("tag", ["-x", ".x", "a" * 129, "", "a+b"])
def test_bad_tag(tag):
    bad(f"example.com/repo:{tag}", repr(tag), "tag")


def test_colon_before_the_last_slash_is_not_a_tag():
    # ``repo:tag/x`` has its last ':' before the last '/', so 'repo:tag' is a path component
    bad("repo:tag/x", "'repo:tag'")


def test_non_ascii_tag_is_refused():
    # Docker's \w is ASCII-only; a Unicode letter is not a tag character
    bad("repo:v\u00e9", "tag")
    bad("repo:\u0661", "tag")


@pytest.mark.parametrize("digest, part", [
    ("sha256:abc", "sha256:abc"),
    ("sha256:" + HEX[:63], HEX[:63]),
    ("sha256:" + HEX + "0", HEX + "0"),
    ("sha512:" + HEX + HEX, "sha512"),
    ("md5:" + HEX[:32], "md5"),
    ("sha256:" + HEX.upper(), HEX.upper()),
    ("sha256:" + "g" * 64, "g" * 64),
    ("", "digest"),
    (HEX, HEX),
])
def test_bad_digest(digest, part):
    error = bad(f"example.com/repo@{digest}", part)
    assert "digest" in str(error)


@pytest.mark.parametrize("text", ["", " ubuntu", "ubuntu ", "ubu ntu", "\tubuntu"])
def test_empty_or_spaces(text):
    bad(text)


def test_space_inside_names_the_component():
    bad("ubu ntu", "'ubu ntu'")
    bad("example.com/a b/c", "'a b'")


def test_double_slash():
    bad("a//b", "''", "repository component")


def test_trailing_slash():
    bad("example.com/repo/", "''", "repository component")
    bad("repo/", "repository component")


def test_leading_slash():
    bad("/repo", "repository component")


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_port_out_of_range(port):
    bad(f"localhost:{port}/repo", port, "port")


def test_port_at_the_edges_is_fine():
    assert parse_ref("localhost:1/repo").registry == "localhost:1"
    assert parse_ref("localhost:65535/repo").registry == "localhost:65535"


def test_bad_registry():
    bad("exa_mple.com/repo", "'exa_mple.com'", "registry")
    bad("-example.com/repo", "registry")
    bad("example.com:/repo", "registry")
    bad("example.com:12345678/repo", "registry")


def test_bad_separators():
    for name in ("a..b", "a._b", "-a", "a-", "a___b", "_a"):
        bad(f"example.com/{name}", repr(name))


def test_repository_too_long():
    long_name = "/".join(["a" * 50] * 6)
    bad(f"example.com/{long_name}", "255")


def test_validate_digest():
    assert validate_digest(DIGEST) == DIGEST
    with pytest.raises(RefError, match="sha1"):
        validate_digest("sha1:" + HEX[:40])
    with pytest.raises(RefError, match="lowercase"):
        validate_digest("sha256:" + HEX.upper())
    with pytest.raises(RefError, match="in 'somewhere'"):
        validate_digest("sha256:", context="somewhere")


# -- round trip ---------------------------------------------------------------------------

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_sep = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, rest: first + "".join(s + a for s, a in rest),
    _alnum, st.lists(st.tuples(_sep, _alnum), max_size=2))
_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,5}[a-zA-Z0-9])?", fullmatch=True)
_port = st.integers(1, 65535).map(str)
_domain = st.one_of(
    st.builds(lambda labels: ".".join(labels), st.lists(_label, min_size=2, max_size=3)),
    st.builds(lambda labels, port: ".".join(labels) + ":" + port,
              st.lists(_label, min_size=1, max_size=3), _port),
    st.just("localhost"),
    st.builds(lambda port: "localhost:" + port, _port),
    st.builds(lambda port: "[::1]:" + port, _port),
    st.builds(lambda a, b: f"{a}.{b}.0.1:5000", st.integers(0, 255), st.integers(0, 255)),
).filter(lambda d: d not in ("index.docker.io",))
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)


@st.composite
def refs(draw):
    registry = draw(_domain)
    path = draw(st.lists(_component, min_size=1, max_size=4))
    if registry == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    return Ref(registry, "/".join(path), draw(st.none() | _tag), draw(st.none() | _digest))


@settings(max_examples=200, deadline=None)
@given(refs())
def test_round_trip(ref):
    assert parse_ref(str(ref)) == ref
    # the default registry does not matter once the registry is written out
    assert parse_ref(str(ref), default_registry="other.example.com") == ref


@settings(max_examples=100, deadline=None)
@given(st.lists(_component, min_size=1, max_size=3), st.none() | _tag)
def test_short_names_round_trip_through_docker_hub(path, tag):
    # a first component with a '.' would name a registry
    assume("." not in path[0])
    text = "/".join(path) + (f":{tag}" if tag else "")
    ref = parse_ref(text)
    assert ref.registry == DOCKER_HUB
    assert parse_ref(str(ref)) == ref
