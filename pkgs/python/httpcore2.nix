# httpcore2: the transport under httpx2, which httpx2 2.17.0 pins to its own
# version (httpcore2==2.17.0). nixpkgs has an older httpcore2 (2.3.0 in the
# mid-2026 tree), so keel's package set replaces it. docs/nix.md, "The MCP
# SDK packages".
{
  lib,
  buildPythonPackage,
  fetchPypi,

  # build-system
  hatchling,
  hatch-fancy-pypi-readme,
  uv-dynamic-versioning,

  # dependencies
  h11,
  truststore,

  # optional-dependencies
  anyio,
  h2,
  socksio,
  trio,
}:

buildPythonPackage rec {
  pname = "httpcore2";
  version = "2.17.0";
  pyproject = true;

  src = fetchPypi {
    inherit pname version;
    # The sha256 PyPI publishes for httpcore2-2.17.0.tar.gz.
    hash = "sha256-z2UrH46JKtpKsYmzlcREyjr76ky5oF+ag1lDEijA0EA=";
  };

  # It asks for uv-dynamic-versioning>=0.14.1; nixpkgs has 0.13.0, and with
  # the version given (its setup hook sets UV_DYNAMIC_VERSIONING_BYPASS)
  # 0.11.2 to 0.13.0 build the same wheel as PyPI's (same metadata, same
  # files; docs/nix.md).
  postPatch = ''
    substituteInPlace pyproject.toml \
      --replace-fail '"uv-dynamic-versioning>=0.14.1"' '"uv-dynamic-versioning"'
  '';

  build-system = [
    hatchling
    hatch-fancy-pypi-readme
    uv-dynamic-versioning
  ];

  dependencies = [
    h11
    truststore
  ];

  optional-dependencies = {
    asyncio = [ anyio ];
    http2 = [ h2 ];
    socks = [ socksio ];
    trio = [ trio ];
  };

  # The sdist ships no tests (they live in the httpx2 repository).
  doCheck = false;

  pythonImportsCheck = [ "httpcore2" ];

  meta = {
    description = "A minimal low-level HTTP client";
    homepage = "https://github.com/pydantic/httpx2";
    license = lib.licenses.bsd3;
  };
}
