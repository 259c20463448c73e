"""The whole loop (``semisam-o1 run``): input validation, the label-free round rule, case
selection, the final outputs and the report. Imports the stages and everything below them.
"""
