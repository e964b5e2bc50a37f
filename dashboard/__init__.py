"""The Streamlit dashboard: a router (app.py) and thin pages (views/) over the lora_analysis library."""
