"""Peers to compare with: llama.cpp's server (built, started, driven) and transformers' generate."""
