"""A local export and its result: the orchestration (`job`), the result (`result`, `codec`, `report`), the content-addressed cache (`cache`) and the export settings declared once (`settings`)."""
