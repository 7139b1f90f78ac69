"""QC pictures, figures and the HTML report of a run."""
