"""What an order costs: the credits, the purchase fee on top, the tax, in the customer's currency.

Pure arithmetic, no I/O. Credits are units of the account currency (1 credit = 1 unit, money.py), and
the customer pays in that same currency, so the credits bought are an exact number of the currency's
minor units (cents): an amount that is not (10.005 USD) is refused, never rounded.

Rounding happens here and nowhere else, once per figure, half up, to the currency's minor unit:
  fee   = round(amount * purchase_percent / 100)
  tax   = round((amount + fee) * rate / 100)        (the rule's rate; 0 under reverse charge)
  total = amount + fee + tax                        (a sum of whole minor units: never rounded again)
The customer pays `total` and receives `amount` in credits; the same figures, in micro-credits, are
what the order stores, the invoice prints and the provider charges.

The tax rule (frozen into the order as its tax snapshot): a profile whose country is in the EU, is
not the issuer's country and carries a tax id is a business buying across an EU border: reverse
charge, rate 0, the buyer accounts for the VAT. Otherwise the rate configured for the profile's
country, else the default rate. No profile: the default rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sidecar.money import MICRO_PER_CREDIT, MoneyError, parse_decimal_scaled

PPM = 1_000_000  # a rate in parts per million: 19% = 190_000
PERCENT_DECIMALS_MAX = 4  # "19.0625" percent is 190_625 ppm, exactly

# ISO 4217 minor units where they are not 2 (the currencies Stripe charges in whole units, and the
# three-decimal ones).
_ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
_THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())

# The EU's member states (ISO 3166 alpha-2; Greece's VAT prefix EL is given as GR).
EU_COUNTRIES = frozenset("AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split())


class TaxRuleKind(StrEnum):
    COUNTRY = "country"  # the rate configured for the buyer's country
    DEFAULT = "default"  # no rate for the country (or no profile): the default rate
    REVERSE_CHARGE = "reverse_charge"  # an EU business in another EU country: 0, the buyer self-assesses


def currency_decimals(currency: str) -> int:
    code = currency.lower()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def parse_percent_ppm(text: str) -> int:
    """'19' -> 190_000; '2.9' -> 29_000 (a non-negative decimal string, at most 4 decimals)."""
    return parse_decimal_scaled(text, PERCENT_DECIMALS_MAX)


def format_ppm_percent(ppm: int) -> str:
    """190_000 -> '19'; 29_000 -> '2.9'."""
    whole, frac = divmod(ppm, 10**PERCENT_DECIMALS_MAX)
    return f"{whole}.{frac:04d}".rstrip("0").rstrip(".")


def round_half_up(numerator: int, denominator: int) -> int:
    assert numerator >= 0 and denominator > 0
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True, slots=True)
class TaxRules:
    rates_ppm: dict[str, int]  # country -> rate
    default_rate_ppm: int
    issuer_country: str  # "" when not configured: no reverse charge
    eu_reverse_charge: bool = True


@dataclass(frozen=True, slots=True)
class Profile:
    legal_name: str
    address: str
    country: str
    tax_id: str | None
    email: str | None = None

    def as_dict(self) -> dict:
        return {
            "legal_name": self.legal_name,
            "address": self.address,
            "country": self.country,
            "tax_id": self.tax_id,
            "email": self.email,
        }


@dataclass(frozen=True, slots=True)
class TaxRule:
    kind: TaxRuleKind
    rate_ppm: int
    country: str | None

    @property
    def label(self) -> str:
        if self.kind is TaxRuleKind.REVERSE_CHARGE:
            return "VAT reverse charge (EU, buyer liable)"
        where = self.country or "default"
        return f"tax {format_ppm_percent(self.rate_ppm)}% ({where})"


def tax_rule(profile: Profile | None, rules: TaxRules) -> TaxRule:
    if profile is None:
        return TaxRule(TaxRuleKind.DEFAULT, rules.default_rate_ppm, None)
    country = profile.country
    if (
        rules.eu_reverse_charge
        and profile.tax_id
        and country in EU_COUNTRIES
        and rules.issuer_country in EU_COUNTRIES
        and country != rules.issuer_country
    ):
        return TaxRule(TaxRuleKind.REVERSE_CHARGE, 0, country)
    if country in rules.rates_ppm:
        return TaxRule(TaxRuleKind.COUNTRY, rules.rates_ppm[country], country)
    return TaxRule(TaxRuleKind.DEFAULT, rules.default_rate_ppm, country)


@dataclass(frozen=True, slots=True)
class Quote:
    currency: str  # lower case, as Stripe writes it
    decimals: int
    amount_micro: int  # credits received
    fee_micro: int
    tax_micro: int
    total_micro: int  # what the customer pays, in micro-units of the currency
    total_minor: int  # the same, in the currency's minor units (what the provider charges)
    fee_ppm: int
    rule: TaxRule

    @property
    def unit_micro(self) -> int:
        return MICRO_PER_CREDIT // 10**self.decimals

    def minor(self, micro: int) -> int:
        return micro // self.unit_micro


def quote(amount_micro: int, currency: str, fee_ppm: int, rule: TaxRule) -> Quote:
    """The order's figures (module docstring). MoneyError if the amount is not whole minor units."""
    decimals = currency_decimals(currency)
    unit = MICRO_PER_CREDIT // 10**decimals
    if amount_micro <= 0 or amount_micro % unit:
        raise MoneyError(f"must be a positive whole number of {currency.upper()} minor units (1/{10**decimals})")
    amount_minor = amount_micro // unit
    fee_minor = round_half_up(amount_minor * fee_ppm, PPM)
    tax_minor = round_half_up((amount_minor + fee_minor) * rule.rate_ppm, PPM)
    total_minor = amount_minor + fee_minor + tax_minor
    return Quote(
        currency=currency.lower(),
        decimals=decimals,
        amount_micro=amount_micro,
        fee_micro=fee_minor * unit,
        tax_micro=tax_minor * unit,
        total_micro=total_minor * unit,
        total_minor=total_minor,
        fee_ppm=fee_ppm,
        rule=rule,
    )


def snapshot(q: Quote, profile: Profile | None) -> dict:
    """The tax snapshot an order freezes: the rule, its rate, the amounts and a copy of the profile."""
    return {
        "rule": q.rule.kind.value,
        "label": q.rule.label,
        "country": q.rule.country,
        "rate_percent": format_ppm_percent(q.rule.rate_ppm),
        "rate_ppm": q.rule.rate_ppm,
        "fee_percent": format_ppm_percent(q.fee_ppm),
        "currency": q.currency,
        "decimals": q.decimals,
        "amount_micro": q.amount_micro,
        "fee_micro": q.fee_micro,
        "taxable_micro": q.amount_micro + q.fee_micro,
        "tax_micro": q.tax_micro,
        "total_micro": q.total_micro,
        "profile": profile.as_dict() if profile else None,
    }


def format_money(micro: int, decimals: int) -> str:
    """12_340_000 micro with 2 decimals -> '12.34' (exact; micro is whole minor units here)."""
    whole, frac = divmod(micro, MICRO_PER_CREDIT)
    if decimals == 0:
        return str(whole)
    return f"{whole}.{frac // 10 ** (6 - decimals):0{decimals}d}"
