"""The engine's front door: the Engine (submit, cancel, generate), its loop thread, the request rules."""
