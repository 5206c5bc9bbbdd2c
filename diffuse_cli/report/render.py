"""The report's HTML: one file, plotly.js embedded once, figures drawn on load.

Figures are stored as one JSON object (``<script type="application/json"
id="figures">``) and drawn by ``Plotly.newPlot`` when the page loads;
pictures are base64 data URIs. Nothing is fetched from the network.
"""

from __future__ import annotations

import datetime
import json

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>diffuse report: {{ title }}</title>
<style>
body { font-family: sans-serif; margin: 0; color: #222; }
header { background: #2d4f73; color: white; padding: 12px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 1.5em; }
nav { padding: 8px 24px; background: #eef2f6; position: sticky; top: 0; z-index: 10; border-bottom: 1px solid #ccd; }
nav a { margin-right: 14px; text-decoration: none; color: #2d4f73; }
nav a.not-run { color: #999; }
main { padding: 0 24px 40px 24px; max-width: 1400px; }
section { border-bottom: 1px solid #ddd; padding-bottom: 16px; }
h2 .status { font-size: 0.6em; padding: 2px 8px; border-radius: 8px; margin-left: 8px; vertical-align: middle; }
.status.run { background: #d9f2dd; color: #225522; }
.status.not-run { background: #eee; color: #666; }
p.folder { color: #555; font-size: 0.9em; margin-top: -8px; }
table { border-collapse: collapse; margin: 8px 0 16px 0; font-size: 0.85em; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 0.8em; max-height: 480px; }
.plot { width: 100%; max-width: 1000px; min-height: 380px; margin: 8px 0; }
figure { display: inline-block; margin: 8px 16px 8px 0; vertical-align: top; }
figure img { max-width: 560px; max-height: 600px; border: 1px solid #ddd; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #ccd; border-radius: 4px; padding: 4px 8px; min-width: 220px; max-width: 420px; }
.card h4 { margin: 4px 0; font-size: 0.9em; }
.card pre { margin: 0; max-height: 260px; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-style: italic; }
</style>
<script>{{ plotlyjs }}</script>
</head>
<body>
<header>
<h1>diffuse report</h1>
<div>{{ inputs }} &middot; written {{ when }} by {{ banner }}</div>
</header>
<nav>{% for s in sections %}<a href="#{{ s.key }}" class="{{ 'run' if s.run else 'not-run' }}">{{ s.key }}{% if not s.run %} (not run){% endif %}</a>{% endfor %}</nav>
<main>
{% for s in sections %}
<section id="{{ s.key }}" data-status="{{ s.status }}">
<h2>{{ s.title }}<span class="status {{ 'run' if s.run else 'not-run' }}">{{ s.status }}</span></h2>
{% if s.folders %}<p class="folder">{{ s.folders | join(', ') }}</p>{% endif %}
{% for b in s.blocks %}
{% if b.kind == 'table' %}
<table>{% if b.title %}<caption>{{ b.title }}</caption>{% endif %}
<tr>{% for h in b.headers %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in b.rows %}<tr>{% for v in r %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% elif b.kind == 'plot' %}
<div class="plot" id="{{ b.id }}" data-title="{{ b.title }}"></div>
{% elif b.kind == 'image' %}
<figure><img src="{{ b.uri }}" alt="{{ b.title }}"><figcaption>{{ b.title }}</figcaption></figure>
{% elif b.kind == 'pre' %}
{% if b.collapsed %}<details><summary>{{ b.title }}</summary><pre>{{ b.text }}</pre></details>
{% else %}{% if b.title %}<h4>{{ b.title }}</h4>{% endif %}<pre>{{ b.text }}</pre>{% endif %}
{% elif b.kind == 'cards' %}
<div class="cards">{% for c in b["items"] %}<div class="card"><h4>{{ c.title }}</h4><pre>{{ c.text }}</pre></div>{% endfor %}</div>
{% elif b.kind == 'heading' %}
<h3>{{ b.text }}</h3>
{% elif b.kind == 'note' %}
<p class="note">{{ b.text }}</p>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</main>
<script type="application/json" id="figures">{{ figures }}</script>
<script>
(function () {
  var figures = JSON.parse(document.getElementById("figures").textContent);
  Object.keys(figures).forEach(function (id) {
    var f = figures[id];
    Plotly.newPlot(id, f.data, f.layout, {responsive: true, displaylogo: false});
  });
})();
</script>
</body>
</html>
"""


def render_html(sections, run) -> str:
    """The whole page: sections (see :mod:`diffuse_cli.report.sections`) with plotly.js embedded."""
    import jinja2
    import plotly.offline

    from diffuse_cli import program

    figures = {}
    for s in sections:
        for b in s.blocks:
            if b["kind"] == "plot":
                b["id"] = f"plot-{len(figures)}"
                figures[b["id"]] = b["figure"]
    # "</" inside a <script> would end it early
    figures_json = json.dumps(figures, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE)
    return template.render(
        title=", ".join(run.inputs),
        inputs=", ".join(run.inputs),
        when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        banner=program.banner("report"),
        sections=sections,
        plotlyjs=_markup(plotly.offline.get_plotlyjs()),
        figures=_markup(figures_json),
    )


def _markup(text: str):
    import markupsafe

    return markupsafe.Markup(text)
