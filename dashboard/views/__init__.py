"""The dashboard's pages (run by `st.navigation` in app.py) and their shared rendering."""
