"""OpenTelemetry for textgen: request and engine-step traces, serving metrics, gRPC context propagation.

`telemetry.server.Telemetry` is what the server installs; `telemetry.interceptors` and `telemetry.exporters`
import neither the engine nor torch, so the client uses them. See the README, section Observability.
"""
