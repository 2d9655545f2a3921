"""Where the dashboard is served: only this machine, unless `modeldiff dashboard --host`
asked for more.

`streamlit run dashboard/app.py` started outside the repository root does not read
`.streamlit/config.toml`, and Streamlit then listens on every network interface: anyone
who can reach the machine could read the results, write triage and run the models. The
app refuses that unless the address was chosen on purpose (`modeldiff dashboard --host`,
which warns and passes it in ALLOWED_HOST).
"""

from __future__ import annotations

from engine.cli.tools import is_loopback  # one definition for the CLI and the app

# Set by `modeldiff dashboard` to the --host it was given (after warning about it).
ALLOWED_HOST = "MODELDIFF_DASHBOARD_HOST"


def exposure(address: str | None, allowed: str | None) -> str | None:
    """Why serving on `address` (Streamlit's server.address; empty: every interface) is
    refused, or None when it reaches this machine only or was `allowed` on purpose."""
    address = address or ""
    if is_loopback(address) or (allowed is not None and allowed == address):
        return None
    where = f"address {address}" if address else "every network interface"
    return (
        f"This dashboard is being served on {where}, so other machines could read the "
        "results, write triage and run the models. Start it with `modeldiff dashboard "
        "--db results.duckdb`, or add `--server.address 127.0.0.1` to `streamlit run` "
        "(`modeldiff dashboard --host ADDRESS` serves other machines on purpose)."
    )
