"""OTLP export through the OpenTelemetry SDK (see taskscope.otlp)."""
