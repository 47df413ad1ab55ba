"""Readable end-of-run summaries (rich tables) for the CLI."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lossmask.prepare import PrepareSummary

NOTE_TEXT = {
    "history_split": "examples from conversations split into one example per assistant turn, because the "
    "chat template "
    "renders earlier assistant turns differently from the final turn (e.g. it drops their reasoning)",
    "template_drops_reasoning": "assistant turns whose reasoning the chat template does not render "
    "(the model will not learn to write it)",
    "template_drops_tool_calls": "assistant turns whose tool calls the chat template does not render "
    "(the model will not learn to call tools)",
    "no_end_marker": "text records without the end marker (trained to the end of the text)",
    "rejected_without_stop": "rejected responses stored without their stop (truncated negatives)",
}


def print_prepare_summary(summary: PrepareSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"lossmask prepare → {summary.out}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    rejected = sum(summary.rejected.values())
    table.add_row("input lines", f"{summary.lines:,}")
    table.add_row("episodes kept", f"{summary.episodes_kept:,}")
    table.add_row("episodes rejected", f"{rejected:,}")
    for reason, n in sorted(summary.rejected.items()):
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row("examples train / val", f"{summary.examples['train']:,} / {summary.examples['val']:,}")
    table.add_row("tokens", f"{summary.tokens:,}")
    table.add_row("trained tokens", f"{summary.trained_tokens:,} ({summary.trained_fraction:.1%})")
    table.add_row("straddling tokens", f"{summary.straddling_tokens:,}")
    table.add_row("truncated examples", f"{summary.truncated:,}")
    if summary.neutralized_special_strings:
        table.add_row("special-token strings neutralized", f"{summary.neutralized_special_strings:,}")
    table.add_row("stop strings", ", ".join(repr(s) for s in summary.stop_strings))
    if summary.packing:
        for name, split in summary.packing["splits"].items():
            table.add_row(
                f"packed {name} (block {summary.packing['block_size']})",
                f"{split['blocks']:,} blocks, {split['efficiency']:.2%} full",
            )
            if split["skipped_too_long"]:
                table.add_row(f"  {name}: longer than the block, not packed", f"{split['skipped_too_long']:,}")
    console.print(table)
    for note, n in sorted(summary.notes.items()):
        console.print(f"[yellow]note:[/] {n:,} × {NOTE_TEXT.get(note, note)}")
    if summary.rejects_file:
        console.print(f"[yellow]rejected lines and reasons:[/] {summary.rejects_file}")
