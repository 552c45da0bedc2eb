"""One small module per signal; each receives frozen records."""
