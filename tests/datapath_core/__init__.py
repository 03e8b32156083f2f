"""Tests for the data-path sans-IO cores: SNI form, ClientHello parser, HTTP/2 guard."""
