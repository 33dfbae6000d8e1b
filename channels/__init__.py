"""Channel provider platform: chat platforms as workspace surfaces.

Channel code never imports the database, `hub` internals or the OpenCode client.
"""
