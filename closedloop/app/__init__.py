"""The entry points: `closedloop` CLI (app.cli), the demo (app.demo), the terminal status line and
summary (app.status), and the bench latency check (app.latency_check)."""
