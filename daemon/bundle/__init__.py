"""Model bundles: build, verify, unpack safely, load (docs/bundles.md).

    build.build(src, out)          bundle.toml + files  ->  {name}-{version}-{digest12}.fdb
    verify.verify_path(path)       re-hash an archive or unpacked bundle against MANIFEST.json
    open_bundle(path, unpack_dir)  verify, unpack to unpack_dir/<digest>/, return a Bundle
    Bundle.instantiate()           import the entrypoint and construct it with a ModelContext
"""

from daemon.bundle.build import Built, build
from daemon.bundle.loader import Bundle, default_unpack_dir, open_bundle
from daemon.bundle.verify import Problem, Verified, verify_dir, verify_path

__all__ = ["Built", "Bundle", "Problem", "Verified", "build", "default_unpack_dir", "open_bundle",
           "verify_dir", "verify_path"]
