"""Fees, tax and rounding of a purchase (issue 9, points 3 and 9): exact to the micro-credit; money in
the customer's currency rounded once per figure, half up, in sidecar/billing/tax.py only."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.billing import tax
from sidecar.billing.tax import Profile, TaxRuleKind, TaxRules
from sidecar.money import MoneyError

CURRENCIES = {"usd": 2, "eur": 2, "jpy": 0, "bhd": 3}
RULES = TaxRules(rates_ppm={"DE": 190_000, "FR": 200_000, "GB": 200_000}, default_rate_ppm=0, issuer_country="DE")


def _nearest_half_up(exact: Fraction) -> int:
    """Independent of tax.round_half_up: the integer nearest `exact`, a tie going up."""
    floor = exact.numerator // exact.denominator
    return floor + (1 if exact - floor >= Fraction(1, 2) else 0)


@given(
    currency=st.sampled_from(sorted(CURRENCIES)),
    amount_minor=st.integers(min_value=1, max_value=10**11),
    fee_ppm=st.integers(min_value=0, max_value=10_000_000),  # up to 1000 %
    rate_ppm=st.integers(min_value=0, max_value=1_000_000),
)
def test_a_quote_is_exact_and_rounded_once_per_figure(currency, amount_minor, fee_ppm, rate_ppm):
    unit = 10 ** (6 - CURRENCIES[currency])
    rule = tax.TaxRule(TaxRuleKind.COUNTRY, rate_ppm, "DE")
    q = tax.quote(amount_minor * unit, currency, fee_ppm, rule)

    assert q.amount_micro == amount_minor * unit, "the credits received are exactly the amount bought"
    fee_minor = _nearest_half_up(Fraction(amount_minor * fee_ppm, 1_000_000))
    tax_minor = _nearest_half_up(Fraction((amount_minor + fee_minor) * rate_ppm, 1_000_000))
    assert q.fee_micro == fee_minor * unit
    assert q.tax_micro == tax_minor * unit
    assert q.total_micro == q.amount_micro + q.fee_micro + q.tax_micro, "the total is a sum, never rounded again"
    assert q.total_minor * unit == q.total_micro
    for figure in (q.fee_micro, q.tax_micro, q.total_micro):
        assert figure % unit == 0, "every figure is whole minor units of the customer's currency"
    # Each rounding is off by at most half a minor unit from the exact figure.
    assert abs(Fraction(q.fee_micro, unit) - Fraction(amount_minor * fee_ppm, 1_000_000)) <= Fraction(1, 2)


@given(
    currency=st.sampled_from(["usd", "bhd"]),
    amount_micro=st.integers(min_value=1, max_value=10**15),
)
def test_an_amount_that_is_not_whole_minor_units_is_refused_not_rounded(currency, amount_micro):
    unit = 10 ** (6 - CURRENCIES[currency])
    rule = tax.TaxRule(TaxRuleKind.DEFAULT, 0, None)
    if amount_micro % unit:
        with pytest.raises(MoneyError):
            tax.quote(amount_micro, currency, 0, rule)
    else:
        assert tax.quote(amount_micro, currency, 0, rule).total_micro == amount_micro


def test_worked_example():
    # 10.00 USD of credits, 2.9 % fee, German VAT 19 %: fee 0.29, taxable 10.29, tax 1.9551 -> 1.96.
    profile = Profile("Kunde GmbH", "Weg 1", "DE", None)
    q = tax.quote(10_000_000, "USD", tax.parse_percent_ppm("2.9"), tax.tax_rule(profile, RULES))
    assert (q.fee_micro, q.tax_micro, q.total_micro, q.total_minor) == (290_000, 1_960_000, 12_250_000, 1225)
    snapshot = tax.snapshot(q, profile)
    assert snapshot["rule"] == "country" and snapshot["rate_percent"] == "19" and snapshot["fee_percent"] == "2.9"
    assert snapshot["profile"]["legal_name"] == "Kunde GmbH" and snapshot["taxable_micro"] == 10_290_000
    assert tax.format_money(q.total_micro, 2) == "12.25" and tax.format_money(5_000_000, 0) == "5"


@pytest.mark.parametrize(
    ("country", "tax_id", "kind", "rate_ppm"),
    [
        ("FR", "FR12345678901", TaxRuleKind.REVERSE_CHARGE, 0),  # an EU business in another EU country
        ("FR", None, TaxRuleKind.COUNTRY, 200_000),  # an EU consumer: the country's rate
        ("DE", "DE123456789", TaxRuleKind.COUNTRY, 190_000),  # a business in the issuer's own country
        ("GB", "GB123456789", TaxRuleKind.COUNTRY, 200_000),  # outside the EU: no EU reverse charge
        ("IT", "IT12345678901", TaxRuleKind.REVERSE_CHARGE, 0),
        ("US", None, TaxRuleKind.DEFAULT, 0),  # no rate configured
    ],
)
def test_the_tax_rule(country, tax_id, kind, rate_ppm):
    rule = tax.tax_rule(Profile("x", "", country, tax_id), RULES)
    assert (rule.kind, rule.rate_ppm) == (kind, rate_ppm)


def test_no_profile_or_no_issuer_country_means_no_reverse_charge():
    assert tax.tax_rule(None, RULES).kind is TaxRuleKind.DEFAULT
    no_issuer = TaxRules(rates_ppm={"FR": 200_000}, default_rate_ppm=0, issuer_country="")
    assert tax.tax_rule(Profile("x", "", "FR", "FR1"), no_issuer).kind is TaxRuleKind.COUNTRY
    off = TaxRules(rates_ppm={"FR": 200_000}, default_rate_ppm=0, issuer_country="DE", eu_reverse_charge=False)
    assert tax.tax_rule(Profile("x", "", "FR", "FR1"), off).rate_ppm == 200_000
