"""A workspace's monthly usage statement (issue 10.4), as CSV and as PDF: the month's opening balance,
its money in and out by kind of row, its usage by provider and model (BYOK apart), and its closing
balance, with opening + every kind's net == closing.

Read from the daily roll-ups (ledger_daily, kept in the ledger's own inserting transaction) only, so a
statement costs the same at any volume, agrees with the ledger to the micro-credit, and still answers
for months archived out of the ledger (their roll-ups stay). Months are UTC calendar months; a month
not over yet is a statement to date.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import date

import asyncpg

from sidecar.billing.invoices import pdf_text
from sidecar.money import format_micro
from sidecar.statements.archive import add_months
from sidecar.statements.filters import QueryRefused

_MONTH_RE = re.compile(r"(\d{4})-(\d{2})\Z")
MONTH_FIRST = date(2000, 1, 1)  # a bound on what a statement may be asked for


def parse_month(text: str) -> date:
    match = _MONTH_RE.match(text)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise QueryRefused(f"month must be YYYY-MM, not {text[:20]!r}")
    month = date(int(match.group(1)), int(match.group(2)), 1)
    if month < MONTH_FIRST:
        raise QueryRefused(f"month must be {MONTH_FIRST:%Y-%m} or later")
    return month


@dataclass(frozen=True, slots=True)
class UsageLine:
    provider: str
    model: str
    byok: bool
    calls: int
    input_tokens: int
    output_tokens: int
    cost_micro: int  # priced cost (BYOK: computed for visibility, not debited)
    fee_micro: int
    debited_micro: int  # what the balance paid: -(balance impact)


@dataclass(frozen=True, slots=True)
class Statement:
    workspace_id: str
    month: date
    opening_micro: int
    net_by_kind_micro: dict[str, int]  # kind -> the balance impact of its rows in the month
    usage: tuple[UsageLine, ...]

    @property
    def closing_micro(self) -> int:
        return self.opening_micro + sum(self.net_by_kind_micro.values())


async def build(conn: asyncpg.Connection, workspace_id: str, month: date) -> Statement:
    """One snapshot (repeatable read), so opening, lines and closing agree with each other."""
    end = add_months(month, 1)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        opening = await conn.fetchval(
            "SELECT coalesce(sum(balance_impact_micro), 0)::bigint FROM ledger_daily "
            "WHERE workspace_id = $1 AND day < $2",
            workspace_id,
            month,
        )
        kinds = await conn.fetch(
            "SELECT kind, sum(balance_impact_micro)::bigint AS net FROM ledger_daily "
            "WHERE workspace_id = $1 AND day >= $2 AND day < $3 GROUP BY kind ORDER BY kind",
            workspace_id,
            month,
            end,
        )
        usage = await conn.fetch(
            "SELECT provider, model, byok, sum(rows)::bigint AS calls, sum(input_tokens)::bigint AS input_tokens, "
            "sum(output_tokens)::bigint AS output_tokens, sum(cost_micro)::bigint AS cost_micro, "
            "sum(fee_micro)::bigint AS fee_micro, (-sum(balance_impact_micro))::bigint AS debited_micro "
            "FROM ledger_daily WHERE workspace_id = $1 AND day >= $2 AND day < $3 AND kind = 'usage' "
            "GROUP BY provider, model, byok ORDER BY byok, provider, model",
            workspace_id,
            month,
            end,
        )
    return Statement(
        workspace_id,
        month,
        opening,
        {row["kind"]: row["net"] for row in kinds},
        tuple(UsageLine(**dict(row)) for row in usage),
    )


CSV_HEADER = (
    "section",
    "kind",
    "provider",
    "model",
    "byok",
    "calls",
    "input_tokens",
    "output_tokens",
    "cost",
    "fee",
    "balance_impact",
    "balance_impact_micro",
)


def to_csv(st: Statement) -> bytes:
    """Every figure of the statement as rows: the opening, each kind's net, each usage line, the closing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    blank = ("",) * 7
    writer.writerow(("opening_balance", "", *blank, "", format_micro(st.opening_micro), st.opening_micro))
    for kind, net in st.net_by_kind_micro.items():
        writer.writerow(("kind_total", kind, *blank, "", format_micro(net), net))
    for line in st.usage:
        writer.writerow(
            (
                "usage",
                "usage",
                line.provider,
                line.model,
                "true" if line.byok else "false",
                line.calls,
                line.input_tokens,
                line.output_tokens,
                format_micro(line.cost_micro),
                format_micro(line.fee_micro),
                format_micro(-line.debited_micro),
                -line.debited_micro,
            )
        )
    writer.writerow(("closing_balance", "", *blank, "", format_micro(st.closing_micro), st.closing_micro))
    return out.getvalue().encode()


def render_pdf(st: Statement) -> bytes:
    from fpdf import FPDF  # a second of import: only the process that renders a statement pays it

    pdf = FPDF(format="A4")
    title = f"Usage statement {st.month:%Y-%m}"
    pdf.set_title(title)
    pdf.set_creator("ai-metering-sidecar")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    period = f"{st.month.isoformat()} to {add_months(st.month, 1).isoformat()} (UTC, end excluded)"
    for text in (f"Workspace: {pdf_text(st.workspace_id)}", f"Period: {period}", "Amounts in credits.", ""):
        pdf.cell(0, 5, text, new_x="LMARGIN", new_y="NEXT")
    with pdf.table(col_widths=(130, 50), text_align=("LEFT", "RIGHT")) as table:
        table.row(("Balance", "Credits"))
        table.row(("Opening balance", format_micro(st.opening_micro)))
        for kind, net in st.net_by_kind_micro.items():
            table.row((f"Net of {kind} rows", format_micro(net)))
        table.row(("Closing balance", format_micro(st.closing_micro)))
    pdf.ln(4)
    pdf.set_font("Helvetica", size=9)
    with pdf.table(col_widths=(52, 14, 22, 26, 26, 26, 26), text_align=("LEFT", *("RIGHT",) * 6)) as table:
        table.row(("Provider / model", "BYOK", "Calls", "Tokens in", "Tokens out", "Fee", "Debited"))
        for line in st.usage:
            table.row(
                (
                    pdf_text(f"{line.provider} / {line.model}"),
                    "yes" if line.byok else "no",
                    str(line.calls),
                    str(line.input_tokens),
                    str(line.output_tokens),
                    format_micro(line.fee_micro),
                    format_micro(line.debited_micro),
                )
            )
    return bytes(pdf.output())
