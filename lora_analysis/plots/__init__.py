"""Plot functions: each takes DataFrames (or plain values) and returns a ``plotly.graph_objects.Figure``.

The same figure serves the dashboard, the HTML report and the tests.
"""
