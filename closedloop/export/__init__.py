"""A finished session folder, turned into something to share: an HTML report (export.report) and
a BIDS dataset (export.bids)."""
