"""Bridges to other NAS-FPN implementations, so their trained weights can be used here."""
