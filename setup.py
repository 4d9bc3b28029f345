"""Install p3quant with its kernel and emulator folders mapped under the library's namespace.

`kernels/` installs as `p3quant.kernels` and `pim_emulator/` as `p3quant.pim_emulator`, so the
top-level import name `kernels` (owned by Hugging Face's `kernels` package) is never taken.
"""

from setuptools import find_packages, setup


def _mapped(folder: str, namespace: str) -> dict[str, str]:
    """Map every package found under `folder` to the same path under `namespace`."""
    mapping = {namespace: folder}
    for sub in find_packages(folder):
        mapping[f"{namespace}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return mapping


package_dir = {"p3quant": "p3quant"}
package_dir.update({f"p3quant.{sub}": f"p3quant/{sub.replace('.', '/')}" for sub in find_packages("p3quant")})
package_dir.update(_mapped("kernels", "p3quant.kernels"))
package_dir.update(_mapped("pim_emulator", "p3quant.pim_emulator"))

setup(
    packages=sorted(package_dir),
    package_dir=package_dir,
    package_data={"p3quant.eval.tasks": ["*.yaml"]},
)
