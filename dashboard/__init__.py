"""modeldiff's Streamlit dashboard: thin views over the results database (`engine.results`)."""
