"""Test support: a real origin registry (CNCF Distribution), a bearer-token server, push helpers."""
