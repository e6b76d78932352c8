"""`pfi-rag train|privacy`: local DP-SGD personalization and the privacy ledger."""

from __future__ import annotations

import math

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pfi_rag.cli.common import config_from, console, fail, print_json

CLIENT_HELP = "Client id (its documents are its store under <data_root>/clients/<id>/, see `pfi-rag ingest`)."


def _check_client(client: str) -> None:
    from pfi_rag.layout import InvalidClientId, validate_client_id

    try:
        validate_client_id(client)
    except InvalidClientId as exc:
        fail(f"--client: {exc}")


def _show(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}g}"


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        ctx: typer.Context,
        client: str = typer.Option(..., "--client", help=CLIENT_HELP),
        epsilon: float = typer.Option(
            None, "--epsilon", help="Epsilon this call may spend (default: privacy.epsilon_per_round)."
        ),
        noise_multiplier: float = typer.Option(
            None, "--noise-multiplier", help="Gaussian noise std / clip norm, instead of --epsilon."
        ),
        steps: int = typer.Option(None, "--steps", help="DP-SGD steps (default: privacy.local_steps)."),
        seed: int = typer.Option(
            None,
            "--seed",
            help="Seed of sampling and noise, for experiments: whoever knows it can regenerate the "
            "noise (default: from the OS).",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """DP-train a client's LoRA adapter on its local data."""
        from pfi_rag.data.corpus import CorpusError, load_corpus, require_training_data, too_little_data
        from pfi_rag.privacy import PrivacyError, PrivacyLedger
        from pfi_rag.privacy.accounting import sample_rate

        _check_client(client)
        if epsilon is not None and noise_multiplier is not None:
            fail("give --epsilon or --noise-multiplier, not both")
        if epsilon is not None and not epsilon > 0:
            fail("--epsilon must be positive")
        if noise_multiplier is not None and noise_multiplier < 0:
            fail("--noise-multiplier must be >= 0")
        if steps is not None and steps < 1:
            fail("--steps must be at least 1")
        cfg = config_from(ctx)
        try:
            corpus = load_corpus(cfg.data_root, client, held_out_share=cfg.data.held_out_share)
            require_training_data(corpus)
        except CorpusError as exc:
            fail(str(exc))
        records = corpus.records
        warning = too_little_data(corpus, cfg.privacy.batch_size)
        if warning:
            typer.echo(f"warning: {warning}", err=True)
        try:
            ledger = PrivacyLedger.open(cfg.data_root, client, cfg.privacy)
            # Refuse before loading the model or parsing a record when the spend cannot fit.
            sigma = noise_multiplier if epsilon is None else None
            sigma = cfg.privacy.noise_multiplier if sigma is None and epsilon is None else sigma
            if sigma is None:
                ledger.check_remaining(epsilon or cfg.privacy.epsilon_per_round)
            else:
                ledger.check(
                    noise_multiplier=sigma,
                    sample_rate=sample_rate(records, cfg.privacy.batch_size),
                    steps=steps or cfg.privacy.local_steps,
                    records=records,
                )
        except PrivacyError as exc:
            fail(str(exc))

        result = _train_client(cfg, corpus, ledger, epsilon, noise_multiplier, steps, seed, json_out)
        if json_out:
            print_json(result)
            return
        console.print(
            f"trained {client} on {result['documents']} documents ({result['held_out_documents']} held out) "
            f"and {result['instructions']} instructions: "
            f"loss {result['loss_before']:.4f} -> {result['loss_after']:.4f}, "
            f"epsilon +{_show(result['epsilon'])} (total {_show(result['epsilon_total'])} of "
            f"{ledger.epsilon_max:g}, {result['accountant']} accountant, delta {result['delta']:.3g}), sigma "
            f"{result['noise_multiplier']:.4g}, {result['steps']} steps; adapter "
            f"v{result['adapter_version']} in {result['adapter_dir']}",
            highlight=False,
        )

    privacy_app = typer.Typer(
        help="A client's privacy ledger: show it, or change its budget on purpose.",
        invoke_without_command=True,
        no_args_is_help=False,
    )
    app.add_typer(privacy_app, name="privacy")

    @privacy_app.callback()
    def privacy(
        ctx: typer.Context,
        client: str = typer.Option(None, "--client", help=CLIENT_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print the ledger as JSON."),
    ) -> None:
        """Show a client's privacy ledger: every spend (DP-SGD, metric and probe releases), the
        budget and its changes, and the epsilon left."""
        if ctx.invoked_subcommand is not None:
            return
        if client is None:
            fail("--client is required: whose ledger to show")
        _show_ledger(ctx, client, json_out)

    @privacy_app.command("set-budget")
    def set_budget(
        ctx: typer.Context,
        epsilon_max: float = typer.Argument(..., help="The client's new total budget (epsilon)."),
        client: str = typer.Option(..., "--client", help=CLIENT_HELP),
        reason: str = typer.Option(..., "--reason", help="Why; kept in the ledger and shown by audits."),
    ) -> None:
        """Change a client's privacy budget deliberately; the change and its reason are recorded.

        The budget is fixed in the ledger when the client first spends; privacy.epsilon_max and
        --set only seed new ledgers. This is the one way to change it afterwards."""
        from pfi_rag.layout import client_dir
        from pfi_rag.privacy import PrivacyError, PrivacyLedger

        _check_client(client)
        cfg = config_from(ctx)
        if not client_dir(cfg.data_root, client).is_dir():
            fail(f"no client {client!r} under {cfg.data_root}/clients: check --client and --data-root")
        try:
            ledger = PrivacyLedger.open(cfg.data_root, client, cfg.privacy)
            before = ledger.epsilon_max
            ledger.set_budget(epsilon_max, reason=reason)
        except (PrivacyError, ValueError) as exc:
            fail(str(exc))
        console.print(
            f"{client}: budget {before:g} -> {epsilon_max:g} (spent {_show(ledger.epsilon_spent)}); "
            "recorded in the ledger's history",
            highlight=False,
        )


def _show_ledger(ctx: typer.Context, client: str, json_out: bool) -> None:
    from pfi_rag.privacy import PrivacyError, PrivacyLedger

    _check_client(client)
    cfg = config_from(ctx)
    try:
        ledger = PrivacyLedger.open(cfg.data_root, client, cfg.privacy)
    except (PrivacyError, ValueError) as exc:
        fail(str(exc))
    if json_out:
        print_json(ledger.to_json() | {"remaining": ledger.remaining})
        return
    table = Table(title=f"privacy ledger of {client}")
    columns = ("when", "what", "sigma", "sample rate", "steps", "records", "C", "epsilon spent")
    columns += ("epsilon after",)
    for column in columns:
        table.add_column(column, justify="left" if column == "when" else "right", no_wrap=column == "when")
    for spend in ledger.spends:
        table.add_row(
            spend.at,
            spend.kind,
            f"{spend.noise_multiplier:.4g}",
            f"{spend.sample_rate:.4g}",
            str(spend.steps),
            str(spend.records) if spend.records else "-",
            "-" if spend.max_grad_norm is None else f"{spend.max_grad_norm:g}",
            _show(spend.epsilon_spent),
            _show(spend.epsilon_after),
        )
    console.print(table)
    for number, entry in enumerate(ledger.budget_history):
        what = "budget set" if number == 0 else "budget changed"
        console.print(f"{entry.at or '-'}  {what} to {entry.epsilon_max:g}: {entry.reason}", highlight=False)
    delta = f"{ledger.delta if ledger.delta is not None else cfg.privacy.delta:.3g}"
    console.print(
        f"spent epsilon {_show(ledger.epsilon_spent)} of {ledger.epsilon_max:g} "
        f"(delta {delta}, {ledger.mechanism} accountant); {_show(ledger.remaining)} left",
        highlight=False,
    )


def _train_client(cfg, corpus, ledger, epsilon, noise_multiplier, steps, seed, quiet: bool) -> dict:
    """Load the model (continuing the client's adapter if it has one), train on the corpus's
    training side (never its held-out documents), save; a dict result."""
    from peft import PeftModel

    from pfi_rag.data.audit_canaries import audit_training_documents
    from pfi_rag.layout import client_adapter_dir
    from pfi_rag.models.adapters import read_adapter_info, save_adapter
    from pfi_rag.models.loading import load_generator
    from pfi_rag.models.lora import attach_lora
    from pfi_rag.privacy import PrivacyError, train_adapter

    client = corpus.client_id
    model, tokenizer, _ = load_generator(cfg.models)
    adapter_dir = client_adapter_dir(cfg.data_root, client)
    previous = read_adapter_info(adapter_dir)
    try:  # an adapter that absorbed more than its ledger records: the ledger was deleted or replaced
        ledger.check_absorbed(previous.epsilon if previous is not None else None)
    except PrivacyError as exc:
        fail(str(exc))
    if previous is not None:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    else:
        model = attach_lora(model, cfg.adapter, seed=cfg.seed)

    total = steps or cfg.privacy.local_steps
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  epsilon {task.fields[epsilon]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=total, loss="-", epsilon="-")

        def on_step(info) -> None:
            loss = "-" if math.isnan(info.loss) else f"{info.loss:.3f}"
            bar.update(task, completed=info.step, loss=loss, epsilon=_show(info.epsilon, 3))

        try:
            result = train_adapter(
                model,
                tokenizer,
                # Audit canaries (privacy.audit_canaries, opt-in) join the DP stream, never the index.
                documents=[*corpus.train, *audit_training_documents(cfg.data_root, client, cfg.privacy)],
                instructions=corpus.instructions,
                cfg=cfg.privacy,
                ledger=ledger,
                seed=seed,
                epsilon=epsilon,
                noise_multiplier=noise_multiplier,
                steps=steps,
                progress=on_step,
            )
        except PrivacyError as exc:
            fail(str(exc))
    info = save_adapter(model, adapter_dir, source="local", epsilon=ledger.epsilon_spent)
    return result.to_json() | {
        "client": client,
        "documents": len(corpus.train),
        "held_out_documents": len(corpus.held_out),
        "instructions": len(corpus.instructions),
        "adapter_dir": str(adapter_dir),
        "adapter_version": info.version,
    }
