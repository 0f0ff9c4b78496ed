"""`medq keygen`: a key for encrypting records and results at rest."""

from __future__ import annotations

import typer
from cryptography.fernet import Fernet

from medq.cli.common import out

app = typer.Typer()


@app.command()
def keygen() -> None:
    """Print a new key for MEDQ_ENCRYPTION_KEY (Fernet). To rotate, put the new key first
    and keep the old one after it, comma-separated, until its data has expired."""
    out.print(Fernet.generate_key().decode(), highlight=False)
