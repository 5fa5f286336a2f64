"""The training loop: Algorithm 1 (`algorithm.py`), its phases (`epoch.py`), its compiled steps
(`steps.py`), its state and optimiser (`state.py`), and the run around it (`loop.py`)."""
