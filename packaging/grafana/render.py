#!/usr/bin/env python3
"""Draws the panels of openai-proxy.json from a real Prometheus to a PNG.

Grafana itself is not needed: each panel's PromQL is asked of Prometheus' HTTP API
(`/api/v1/query_range`, `/api/v1/query`) over the given time range, and drawn with matplotlib
where the dashboard places it. It shows the dashboard's panels with a run's data, not a
Grafana screenshot.

    python3 render.py --prometheus http://127.0.0.1:9090 --start UNIX --end UNIX --out dashboard.png
"""

import argparse
import datetime
import json
import pathlib
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DASHBOARD = pathlib.Path(__file__).with_name("openai-proxy.json")


def query(prometheus, path, params):
    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = json.load(answer)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]["result"]


def promql(expr, rate_interval):
    """The panel's PromQL with the dashboard's variables filled in as Grafana would."""
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", ".*")


def legend(template, labels):
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template or ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def scaled(value, unit):
    """A value as the panel's unit shows it, and the axis label."""
    if unit == "percentunit":
        return value * 100, "%"
    if unit == "Bps":
        return value / 1024, "KiB/s"
    if unit == "s":
        return value * 1000, "ms"
    return value, {"reqps": "req/s", "ops": "/s"}.get(unit, "")


def draw_series(ax, panel, args):
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    for target in panel["targets"]:
        params = {
            "query": promql(target["expr"], args.rate_interval),
            "start": args.start,
            "end": args.end,
            "step": args.step,
        }
        for series in query(args.prometheus, "query_range", params):
            points = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
            if not points:
                continue
            times = [datetime.datetime.fromtimestamp(t) for t, _ in points]
            values = [scaled(v, unit)[0] for _, v in points]
            ax.plot(times, values, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
    ax.set_ylabel(scaled(0, unit)[1], fontsize=8)
    ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left")


def draw_stat(ax, panel, args):
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    target = panel["targets"][0]
    result = query(args.prometheus, "query", {"query": promql(target["expr"], args.rate_interval), "time": args.end})
    text = "no data"
    if result:
        value = float(result[0]["value"][1])
        if unit == "dateTimeFromNow":
            ago = float(args.end) - value / 1000
            text = f"{ago:.0f} s before the end"
        else:
            number, suffix = scaled(value, unit)
            text = f"{number:,.3g} {suffix}".strip()
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=18, transform=ax.transAxes)
    ax.set_axis_off()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--start", required=True, help="Unix seconds")
    parser.add_argument("--end", required=True, help="Unix seconds")
    parser.add_argument("--step", default="2")
    parser.add_argument("--rate-interval", default="10s", help="what $__rate_interval stands for")
    parser.add_argument("--out", default="dashboard.png")
    args = parser.parse_args()

    dashboard = json.loads(DASHBOARD.read_text())
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    figure = plt.figure(figsize=(16, rows * 0.42))
    grid = figure.add_gridspec(rows, 24, hspace=4, wspace=2, top=0.95)
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        ax = figure.add_subplot(grid[pos["y"] : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]])
        ax.set_title(panel["title"], fontsize=10, loc="left")
        if panel["type"] == "stat":
            draw_stat(ax, panel, args)
        else:
            draw_series(ax, panel, args)
    start = datetime.datetime.fromtimestamp(float(args.start)).strftime("%Y-%m-%d %H:%M")
    figure.suptitle(
        f"openai-proxy dashboard panels, drawn from a real run's Prometheus data ({start}, {args.prometheus})",
        fontsize=11,
        y=0.975,
    )
    figure.savefig(args.out, dpi=90, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
