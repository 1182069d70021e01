"""The report: tables, figures, the claims checked, the HTML page and the README's sections."""
