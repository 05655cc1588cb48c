"""One module per engine; each turns a validated config into a ready `StepModel` for this rank."""
