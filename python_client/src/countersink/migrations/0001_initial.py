# The table itself is created by the sidecar's migrations; Django only records the model.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="UserNotificationsCount",
            fields=[
                (
                    "user",
                    models.OneToOneField(
                        db_column="user_id",
                        db_constraint=False,
                        on_delete=django.db.models.deletion.DO_NOTHING,
                        primary_key=True,
                        related_name="+",
                        serialize=False,
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                ("unread_count", models.BigIntegerField(default=0)),
            ],
            options={
                "verbose_name": "user notifications count",
                "verbose_name_plural": "user notifications counts",
                "db_table": "countersink_usernotificationscount",
                "managed": False,
            },
        ),
    ]
