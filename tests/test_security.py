"""The README's cluster set-up is safe by default, and works as written: univ's Dask backend reaches a
TLS-only scheduler with the certificates named by the Dask settings the README exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from universality.core.errors import UnivError
from universality.runtime.engine import Engine

README = Path(__file__).parent.parent / "README.md"


def cluster_example() -> str:
    section = README.read_text().split("## GPU, parallel seeds and more than one machine")[1].split("\n## ")[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))


def test_readme_cluster_example_binds_nothing_to_every_interface_without_tls():
    example = cluster_example()
    assert "0.0.0.0" not in example and "tcp://" not in example
    assert "dask scheduler --protocol tls" in example and "dask worker tls://" in example
    assert "--scheduler tls://" in example
    assert "mlflow server --host 127.0.0.1" in example and "ssh -N -L 5000:127.0.0.1:5000" in example
    assert "--tracking-uri http://127.0.0.1:5000" in example


def readme_dask_settings() -> dict[str, str]:
    """The DASK_* variables the README's example exports, as Dask reads them (dotted keys)."""
    import dask

    variables = dict(re.findall(r"(DASK_\w+)=(\S+)", cluster_example()))
    flat = {}
    def walk(tree, prefix=""):
        for key, value in tree.items():
            walk(value, f"{prefix}{key}.") if isinstance(value, dict) else flat.__setitem__(f"{prefix}{key}", value)
    walk(dask.config.collect_env(variables))
    return flat


def test_readme_dask_variables_name_real_settings():
    pytest.importorskip("distributed")  # its settings' defaults load with it
    import dask

    settings = readme_dask_settings()
    assert len(settings) == 4
    for key in settings:  # each one overrides a setting Dask has (a typo would be silently ignored)
        dask.config.get(key)


@pytest.mark.slow
def test_engine_reaches_a_tls_only_scheduler_with_the_readme_settings():
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    import dask
    from distributed.security import Security

    certificates = Security.temporary()  # one CA and certificate, as PEM text (Dask takes text or paths)
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=1, protocol="tls://",
                                  host="127.0.0.1", security=certificates, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with pytest.raises(UnivError, match="TLS"):  # no certificate, no connection (and one line, not a traceback)
            Engine(backend="dask", scheduler=cluster.scheduler_address).map(pow, [(2, 3)])
        values = {True: True, "ca.pem": certificates.tls_ca_file, "node.pem": certificates.tls_client_cert,
                  "node-key.pem": certificates.tls_client_key}
        with dask.config.set({key: values[value] for key, value in readme_dask_settings().items()}):
            engine = Engine(backend="dask", scheduler=cluster.scheduler_address)
            assert engine.map(pow, [(2, 3), (3, 2)]) == [8, 9]
