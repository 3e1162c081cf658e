"""Results -> one self-contained HTML page (Plotly.js inline) and the notebook display of results."""
