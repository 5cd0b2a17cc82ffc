"""Money in: payment orders, the payment provider, fees and tax, refunds and invoices (DESIGN.md section 11)."""
