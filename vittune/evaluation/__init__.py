"""From a trained run to results: scores, calibration, figures and prediction files.

Pure building blocks for `vittune evaluate` and `vittune predict`: report.py (scores from
probabilities), figures.py (PNG figures), inputs.py (which images to predict) and
prediction_csv.py (the predictions file).
"""
